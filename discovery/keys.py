"""The etcd key layout of the mesh: /mbc/v1/participants/<group>/<bot_id>/<instance_id>."""

from __future__ import annotations

from mbc.runtime.names import validate_name

PARTICIPANTS_PREFIX = "/mbc/v1/participants/"

__all__ = [
    "PARTICIPANTS_PREFIX",
    "bot_prefix",
    "group_participants_prefix",
    "parse_participant_key",
    "participant_key",
    "validate_name",
]


def group_participants_prefix(group: str) -> str:
    """The prefix of the participant keys of one group (what its bots may read)."""
    validate_name("group", group)
    return f"{PARTICIPANTS_PREFIX}{group}/"


def bot_prefix(group: str, bot_id: str) -> str:
    """The prefix of every instance key of one bot (what its etcd user may write)."""
    validate_name("bot_id", bot_id)
    return f"{group_participants_prefix(group)}{bot_id}/"


def participant_key(group: str, bot_id: str, instance_id: str) -> str:
    validate_name("instance_id", instance_id)
    return f"{bot_prefix(group, bot_id)}{instance_id}"


def parse_participant_key(key: str) -> tuple[str, str, str]:
    """Return (group, bot_id, instance_id) of a participant key; ValueError if it is not one."""
    if not key.startswith(PARTICIPANTS_PREFIX):
        raise ValueError(f"key {key!r} is not under {PARTICIPANTS_PREFIX}")
    parts = key[len(PARTICIPANTS_PREFIX) :].split("/")
    if len(parts) != 3:
        raise ValueError(f"key {key!r} is not {PARTICIPANTS_PREFIX}<group>/<bot_id>/<instance_id>")
    group, bot_id, instance_id = parts
    validate_name("group", group)
    validate_name("bot_id", bot_id)
    validate_name("instance_id", instance_id)
    return group, bot_id, instance_id
