"""Service discovery for the mesh: bots register in etcd under a lease, routers watch them."""

from discovery.errors import (
    EtcdAuthFailed,
    EtcdError,
    EtcdLimitExceeded,
    EtcdPermissionDenied,
    EtcdSettingsError,
    EtcdUnavailable,
    LeaseNotFound,
    RegistrationConflict,
    RevisionCompacted,
    WatchCompacted,
)
from discovery.etcd_client import EtcdClient, KeyValue, WatchEvent
from discovery.keys import (
    DEFINITIONS_PREFIX,
    PARTICIPANTS_PREFIX,
    definition_key,
    parse_participant_key,
    participant_key,
    validate_name,
)
from discovery.leases import LeasedKey, LeaseKeeper
from discovery.registration import DefinitionError, Registration, forget_definition
from discovery.watcher import ParticipantSnapshot, ParticipantWatcher, check_registration, read_participants

__all__ = [
    "DEFINITIONS_PREFIX",
    "PARTICIPANTS_PREFIX",
    "DefinitionError",
    "EtcdAuthFailed",
    "EtcdClient",
    "EtcdError",
    "EtcdLimitExceeded",
    "EtcdPermissionDenied",
    "EtcdSettingsError",
    "EtcdUnavailable",
    "KeyValue",
    "LeaseKeeper",
    "LeaseNotFound",
    "LeasedKey",
    "ParticipantSnapshot",
    "ParticipantWatcher",
    "Registration",
    "RegistrationConflict",
    "RevisionCompacted",
    "WatchCompacted",
    "WatchEvent",
    "check_registration",
    "definition_key",
    "forget_definition",
    "parse_participant_key",
    "participant_key",
    "read_participants",
    "validate_name",
]
