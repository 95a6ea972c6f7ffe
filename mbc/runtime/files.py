"""Writing files that readers in other threads or processes see whole or not at all."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def temporary_beside(target: Path) -> Path:
    """A temporary path beside `target`, unique to this process and thread, to write completely
    and then rename onto `target` (`os.replace`: atomic on one file system)."""
    return target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
