"""Helpers of the fault suite (tests/test_faults.py): what a component logged, what the router ranks."""

from __future__ import annotations

import json

from mbc.testing.processes import ComponentProcess
from meshlib import match


def logged(component: ComponentProcess, event: str) -> list[dict]:
    """The JSON log lines of `component` whose event is `event`, oldest first."""
    lines = []
    for line in component.log_path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == event:
            lines.append(record)
    return lines


async def ranked_first(router_address: str, text: str, group: str) -> str:
    """The bot the router ranks first for `text` in `group` ("" when none)."""
    r = await match(router_address, text, group=group)
    return r.candidates[0].bot_id if r.candidates else ""
