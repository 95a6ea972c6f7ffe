"""Per-group settings in etcd, read by bots with a short cache."""

from __future__ import annotations

import time

from google.protobuf.message import DecodeError

from discovery.etcd_client import EtcdClient
from discovery.keys import validate_name
from mbc.runtime.logs import get_logger
from mbc.v1 import participant_pb2

log = get_logger(__name__)

GROUPS_PREFIX = "/mbc/v1/groups/"
DEFAULT_UNAVAILABLE_MESSAGE = "{bot} is not available right now. Please try again in a few minutes."
"""What a bot answers when the best match belongs to a bot of its group with no live instance,
unless the group sets its own (`GroupSettings.unavailable_message`, `mbc group --unavailable-message`)."""


def group_prefix(group: str) -> str:
    """The prefix of one group's keys (what its bots may read)."""
    validate_name("group", group)
    return f"{GROUPS_PREFIX}{group}/"


def settings_key(group: str) -> str:
    return f"{group_prefix(group)}settings"


def unavailable_message(settings: participant_pb2.GroupSettings, bot: str) -> str:
    """The group's unavailable message (the default when it sets none) about `bot` (its display
    name, or its id): every "{bot}" replaced."""
    return (settings.unavailable_message or DEFAULT_UNAVAILABLE_MESSAGE).replace("{bot}", bot)


async def write_group_settings(client: EtcdClient, group: str, settings: participant_pb2.GroupSettings) -> None:
    await client.put(settings_key(group), settings.SerializeToString())


async def read_group_settings(client: EtcdClient, group: str) -> participant_pb2.GroupSettings:
    kv = await client.get(settings_key(group))
    return participant_pb2.GroupSettings.FromString(kv.value) if kv else participant_pb2.GroupSettings()


class GroupSettingsCache:
    """The settings of one group, read again from etcd at most every `max_age` seconds.

    If etcd cannot be read, the last settings read are kept (defaults before the first read).
    """

    def __init__(self, client: EtcdClient | None, group: str, max_age: float = 2.0) -> None:
        self._client = client
        self._group = group
        self._max_age = max_age
        self._settings = participant_pb2.GroupSettings()
        self._read_at = float("-inf")

    async def get(self) -> participant_pb2.GroupSettings:
        if self._client is not None and time.monotonic() - self._read_at > self._max_age:
            try:
                self._settings = await read_group_settings(self._client, self._group)
            except Exception as e:
                log.warning("group_settings_unreadable", group=self._group, error=str(e))
            self._read_at = time.monotonic()
        return self._settings


async def read_decision_costs(client: EtcdClient) -> dict[str, participant_pb2.DecisionCosts]:
    """The decision costs of every group whose settings set some (`GroupSettings.decision_costs`);
    a settings record that cannot be read is left out, with a warning."""
    items, _ = await client.get_prefix(GROUPS_PREFIX)
    out: dict[str, participant_pb2.DecisionCosts] = {}
    for kv in items:
        group, _, leaf = kv.key[len(GROUPS_PREFIX) :].partition("/")
        if leaf != "settings":
            continue
        try:
            settings = participant_pb2.GroupSettings.FromString(kv.value)
        except DecodeError as e:
            log.warning("group_settings_unreadable", group=group, error=str(e))
            continue
        if settings.HasField("decision_costs") and settings.decision_costs.ListFields():
            out[group] = settings.decision_costs
    return out
