"""The package's shape, checked: its layers import downward only and no package's modules
import each other in a loop (the import-linter contracts in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    pytest.importorskip("importlinter", reason="pip install -e '.[test]' installs import-linter")
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(no_cache=True))"
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_layer_contracts_hold():
    out = _lint(ROOT)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 kept, 0 broken" in out.stdout


def test_layer_contracts_catch_an_upward_import_and_a_cycle(tmp_path):
    """The contracts can fail: a copy of the package where the engine imports the pipeline
    and the task registry imports a task module breaks both."""
    import shutil

    shutil.copytree(ROOT / "src" / "tether", tmp_path / "tether", ignore=shutil.ignore_patterns("__pycache__", "static"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "tether" / "engine.py", "a") as f:
        f.write("\n\ndef _upward():\n    from tether.pipeline import Pipeline  # noqa: F401\n")
    with open(tmp_path / "tether" / "tasks" / "base.py", "a") as f:
        f.write("\n\ndef _cycle():\n    from tether.tasks import arith  # noqa: F401\n")
    out = _lint(tmp_path)
    assert out.returncode != 0
    assert "tether.engine is not allowed to import tether.pipeline" in out.stdout
    assert "0 kept, 2 broken" in out.stdout
