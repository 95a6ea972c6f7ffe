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


class LeaseNotFound(EtcdError):
    """The lease does not exist (expired or revoked)."""
