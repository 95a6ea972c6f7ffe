"""Service discovery for the mesh: bots register in etcd under a lease, routers watch them."""

from discovery.errors import EtcdError, EtcdUnavailable, LeaseNotFound, WatchCompacted
from discovery.etcd_client import EtcdClient, KeyValue, WatchEvent
from discovery.keys import PARTICIPANTS_PREFIX, parse_participant_key, participant_key, validate_name
from discovery.local_etcd import EtcdNotFound, LocalEtcd, find_etcd
from discovery.registration import Registration
from discovery.watcher import ParticipantSnapshot, ParticipantWatcher, check_registration

__all__ = [
    "PARTICIPANTS_PREFIX",
    "EtcdClient",
    "EtcdError",
    "EtcdNotFound",
    "EtcdUnavailable",
    "KeyValue",
    "LeaseNotFound",
    "LocalEtcd",
    "ParticipantSnapshot",
    "ParticipantWatcher",
    "Registration",
    "WatchCompacted",
    "WatchEvent",
    "check_registration",
    "find_etcd",
    "parse_participant_key",
    "participant_key",
    "validate_name",
]
