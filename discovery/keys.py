"""The etcd key layout of the mesh: /mbc/v1/participants/<group>/<bot_id>/<instance_id> (a live
instance, under its lease) and /mbc/v1/definitions/<group>/<bot_id> (the bot's definition, without a
lease: it outlives the instances, so that the router knows a bot that is absent for a while), and
/mbc/v1/routers/<router_id> (a serving router replica, under its lease: discovery/routers.py);

/mbc/v1/calibration/ (the routers' calibration set, discovery/calibration.py)."""

from __future__ import annotations

from mbc.runtime.names import validate_name

PARTICIPANTS_PREFIX = "/mbc/v1/participants/"
DEFINITIONS_PREFIX = "/mbc/v1/definitions/"
ROUTERS_PREFIX = "/mbc/v1/routers/"
CALIBRATION_PREFIX = "/mbc/v1/calibration/"
CALIBRATION_CURRENT = f"{CALIBRATION_PREFIX}current"
"""Names the calibration set in use: {"digest", "chunks", "bytes"} (JSON)."""

__all__ = [
    "CALIBRATION_CURRENT",
    "CALIBRATION_PREFIX",
    "calibration_chunk_prefix",
    "DEFINITIONS_PREFIX",
    "PARTICIPANTS_PREFIX",
    "ROUTERS_PREFIX",
    "bot_prefix",
    "definition_key",
    "parse_definition_key",
    "group_participants_prefix",
    "parse_participant_key",
    "participant_key",
    "parse_router_key",
    "router_key",
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


def definition_key(group: str, bot_id: str) -> str:
    """The key of a bot's definition: written by its instances, deleted only when it is forgotten."""
    validate_name("group", group)
    validate_name("bot_id", bot_id)
    return f"{DEFINITIONS_PREFIX}{group}/{bot_id}"


def parse_definition_key(key: str) -> tuple[str, str]:
    """Return (group, bot_id) of a definition key; ValueError if it is not one."""
    if not key.startswith(DEFINITIONS_PREFIX):
        raise ValueError(f"key {key!r} is not under {DEFINITIONS_PREFIX}")
    parts = key[len(DEFINITIONS_PREFIX) :].split("/")
    if len(parts) != 2:
        raise ValueError(f"key {key!r} is not {DEFINITIONS_PREFIX}<group>/<bot_id>")
    group, bot_id = parts
    validate_name("group", group)
    validate_name("bot_id", bot_id)
    return group, bot_id


def router_key(router_id: str) -> str:
    """The key of a router replica's record."""
    validate_name("router_id", router_id)
    return f"{ROUTERS_PREFIX}{router_id}"


def parse_router_key(key: str) -> str:
    """The router id of a router key; ValueError if it is not one."""
    if not key.startswith(ROUTERS_PREFIX):
        raise ValueError(f"key {key!r} is not under {ROUTERS_PREFIX}")
    router_id = key[len(ROUTERS_PREFIX) :]
    validate_name("router_id", router_id)
    return router_id


def calibration_chunk_prefix(digest: str) -> str:
    """The prefix of the chunks of one calibration set, by the digest of its text."""
    validate_name("digest", digest)
    return f"{CALIBRATION_PREFIX}sets/{digest}/"
