"""The layers of the packages (pyproject.toml, [tool.importlinter]) hold: `make test` enforces the
contract that `make lint` checks with `lint-imports`."""

from pathlib import Path

import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent


def test_imports_follow_the_layers(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the root packages are found from the project's root
    monkeypatch.syspath_prepend(str(ROOT))
    configuration.configure()  # as the `lint-imports` command does
    kept = lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True)
    report = capsys.readouterr().out
    assert kept, "the import contract is broken (pyproject.toml, [tool.importlinter]):\n" + report
