"""Names the mesh accepts for groups, bot ids and instance ids (they become etcd keys and SPIFFE ids)."""

from __future__ import annotations

import re

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def validate_name(kind: str, value: str) -> None:
    """Raise ValueError unless `value` is a valid name (group, bot id, instance id, ...)."""
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} is invalid: use 1-64 of letters, digits, '.', '_', '-', starting with a letter or digit"
        )
