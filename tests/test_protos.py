"""The committed generated code is what scripts/gen_protos.py makes from protos/ now."""

import subprocess
import sys
from pathlib import Path

import pytest

# Markers per test: `unit` where marked; tests/conftest.py marks the others `integration`.

ROOT = Path(__file__).resolve().parent.parent


def test_generated_code_is_up_to_date(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)], check=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "the generator produced nothing"
    stale = [str(p) for p in fresh if (ROOT / p).read_bytes() != (tmp_path / p).read_bytes()]
    assert not stale, f"regenerate with `make protos`: stale files {stale}"
    committed = sorted(p.relative_to(ROOT) for p in (ROOT / "mbc" / "v1").glob("*_pb2*"))
    assert committed == fresh, "generated files without a .proto (or the reverse)"


@pytest.mark.unit
def test_enums_start_with_unspecified():
    from mbc.v1 import bot_pb2, common_pb2

    for enum in (common_pb2.Rating, bot_pb2.Outcome):
        assert enum.Name(0).endswith("_UNSPECIFIED")
