"""Progress bars of the long steps of a router's build: embedding phrases, reading cached vectors,
indexing them. On stderr, only when it is a terminal and the step is long; `MBC_PROGRESS=1`
shows them anyway (a log collector that keeps stderr), `MBC_PROGRESS=0` never."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

MIN_ITEMS = 1024
"""Steps with fewer items get no bar: they take well under a second."""


def progress_bar(total: int, desc: str, unit: str = "phrase", min_items: int = MIN_ITEMS):
    """A tqdm bar; `update(n)` may be called from any thread."""
    forced = os.environ.get("MBC_PROGRESS", "")
    disable: bool | None = None if total >= min_items else True  # None: tqdm shows it on a terminal only
    if forced in ("1", "0"):
        disable = forced == "0"
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=disable, mininterval=0.5)
