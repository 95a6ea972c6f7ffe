"""The CLINC150 files as the benches read them: `domains.json` and `clinc150_public.json`.

A module of its own, light to import: the index bench's measuring process imports it, and its
memory is part of what that process reports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def default_data_dir() -> Path:
    env = os.environ.get("MBC_CLINC150")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / "shared" / "data" / "clinc150"


def load_clinc(data_dir: Path) -> tuple[dict[str, list[str]], dict[str, list[str]], list[str], list[str]]:
    """(domain → intents, intent → train utterances, distinct val utterances, oos_train utterances)."""
    domains = json.loads((data_dir / "domains.json").read_text())
    data = json.loads((data_dir / "clinc150_public.json").read_text())
    train: dict[str, list[str]] = {}
    for text, intent in data["train"]:
        train.setdefault(intent, []).append(text)
    val = list(dict.fromkeys(text for text, _ in data["val"]))
    warm = list(dict.fromkeys(text for text, _ in data.get("oos_train", [])))
    return domains, train, val, warm
