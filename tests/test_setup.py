"""scripts/setup.sh (run by `make lab` / `make test`): once .venv is installed, a re-run calls no pip at all
(issue #22 item 1: the lab must start offline). Runs the real script on a copy of the repository's
pyproject.toml with a fake .venv/bin/python that records its calls instead of installing anything."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
exit "${FAKE_PIP_RC:-0}"
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository copy holding only what setup.sh reads, and a .venv whose python logs each call."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def setup(repo: Path, rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, FAKE_PIP_RC=str(rc))
    return subprocess.run(["bash", str(repo / "scripts" / "setup.sh")], capture_output=True, text=True,
                          env=env, timeout=60)


def pip_calls(repo: Path) -> list[str]:
    log = repo / ".venv" / "calls.log"
    return [l for l in log.read_text().splitlines() if "pip" in l] if log.exists() else []


def test_second_run_calls_no_pip(repo):
    first = setup(repo)
    assert first.returncode == 0, first.stderr
    installed = pip_calls(repo)
    assert any("-e .[dev]" in c for c in installed) and any("torch==" in c for c in installed)
    assert (repo / ".venv" / ".dbrx-lab-setup").is_file()
    again = setup(repo)
    assert again.returncode == 0, again.stderr
    assert pip_calls(repo) == installed, "an up-to-date .venv must not run pip (it fails offline)"
    assert "up to date" in again.stdout


def test_changed_pyproject_or_missing_stamp_reinstalls(repo):
    assert setup(repo).returncode == 0
    n = len(pip_calls(repo))
    with open(repo / "pyproject.toml", "a") as f:
        f.write("\n# a new dependency\n")
    assert setup(repo).returncode == 0
    assert len(pip_calls(repo)) == 2 * n
    (repo / ".venv" / ".dbrx-lab-setup").unlink()
    assert setup(repo).returncode == 0
    assert len(pip_calls(repo)) == 3 * n


def test_failed_install_leaves_no_stamp(repo):
    failed = setup(repo, rc=1)
    assert failed.returncode != 0
    assert not (repo / ".venv" / ".dbrx-lab-setup").exists()
    assert setup(repo).returncode == 0 and len(pip_calls(repo)) > 1      # the next run installs again
