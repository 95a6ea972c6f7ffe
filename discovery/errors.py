"""Errors raised by the discovery package; callers never see the etcd client library's own types."""

from __future__ import annotations


class EtcdError(Exception):
    """An etcd request failed for a reason other than those below (a bug or a misconfiguration)."""


class EtcdUnavailable(EtcdError):
    """etcd cannot be reached, the connection broke, or a request or watch timed out. Retry later."""


class WatchCompacted(EtcdError):
    """The watch start revision was compacted: list the prefix again and watch from that list."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revisions up to {compact_revision} were compacted; list again and re-watch")
        self.compact_revision = compact_revision


class RevisionCompacted(EtcdError):
    """A read at a revision older than etcd's last compaction: read the latest revision instead."""


class EtcdLimitExceeded(EtcdError):
    """A request or a response is over one of etcd's limits (--max-request-bytes, this client's
    receive limit, --quota-backend-bytes): sending the same again fails the same way."""


class LeaseNotFound(EtcdError):
    """The lease does not exist (expired or revoked)."""


class EtcdSettingsError(ValueError):
    """The etcd access settings cannot work: a TLS or password file cannot be read, a setting is
    missing its partner (cert without key, user without password file), http mixed with TLS."""


class EtcdAuthFailed(EtcdError):
    """etcd refused the credentials (wrong user name or password, or TLS settings that do not fit
    the server). Retrying does not help: fix the configuration."""


class EtcdPermissionDenied(EtcdError):
    """The etcd user of this component may not read or write that key (see `mbc etcd-auth`)."""


class RegistrationConflict(EtcdError):
    """The participant key is held by another live registration (another lease): it is not overwritten."""

    def __init__(self, key: str, holder_lease: int) -> None:
        super().__init__(
            f"{key} is registered by another instance (lease {holder_lease:x}); refusing to "
            "overwrite it: give this instance another instance id, or stop the other one"
        )
        self.key = key
        self.holder_lease = holder_lease
