"""Service discovery for the mesh: bots register in etcd under a lease, routers watch them."""

from discovery.errors import (
    EtcdAuthFailed,
    EtcdError,
    EtcdPermissionDenied,
    EtcdSettingsError,
    EtcdUnavailable,
    LeaseNotFound,
    RegistrationConflict,
    WatchCompacted,
)
from discovery.etcd_client import EtcdClient, KeyValue, WatchEvent
from discovery.keys import PARTICIPANTS_PREFIX, parse_participant_key, participant_key, validate_name
from discovery.registration import Registration
from discovery.watcher import ParticipantSnapshot, ParticipantWatcher, check_registration

__all__ = [
    "PARTICIPANTS_PREFIX",
    "EtcdAuthFailed",
    "EtcdClient",
    "EtcdError",
    "EtcdPermissionDenied",
    "EtcdSettingsError",
    "EtcdUnavailable",
    "KeyValue",
    "LeaseNotFound",
    "ParticipantSnapshot",
    "ParticipantWatcher",
    "Registration",
    "RegistrationConflict",
    "WatchCompacted",
    "WatchEvent",
    "check_registration",
    "parse_participant_key",
    "participant_key",
    "validate_name",
]
