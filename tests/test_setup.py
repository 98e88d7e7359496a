"""Set-up and the lab launcher (issue #22 items 1-4).

- scripts/setup.sh (run by `make lab` / `make test`): once .venv is installed, a re-run calls no pip at all
  (the lab must start offline); the torch build is chosen for the machine (scripts/torch_choice.sh); on macOS
  it needs no apt. Runs the real script on a copy of the repository's pyproject.toml with a fake
  .venv/bin/python that records its calls instead of installing anything, and fake uname / nvidia-smi.
- scripts/lab.py (`make lab`): JupyterLab serves a working copy, never the tracked notebooks/, and a
  pre-save hook strips any notebook saved inside notebooks/.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# the venv's python: logs each call; `pip install --dry-run` (torch_choice's look for a local wheel) answers
# FAKE_LOCAL_RC (0: a local torch wheel exists), every other call FAKE_PIP_RC
FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$(dirname "$0")/../calls.log"
case "$*" in *--dry-run*) exit "${FAKE_LOCAL_RC:-0}" ;; esac
exit "${FAKE_PIP_RC:-0}"
"""


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository copy holding only what setup.sh reads, and a .venv whose python logs each call."""
    (tmp_path / "scripts").mkdir()
    for name in ("setup.sh", "torch_choice.sh"):
        shutil.copy(ROOT / "scripts" / name, tmp_path / "scripts" / name)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    python = tmp_path / ".venv" / "bin" / "python"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def fake_bin(tmp: Path, uname: str = "Linux", gpu: bool = False) -> Path:
    """A folder to put first on PATH: `uname -s` says `uname`; nvidia-smi -L lists a GPU or fails."""
    bin_dir = tmp / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    scripts = {"uname": f"#!/bin/sh\necho {uname}\n",
               "nvidia-smi": ("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n" if gpu else
                              "#!/bin/sh\necho 'NVIDIA-SMI has failed: no NVIDIA driver' >&2\nexit 9\n"),
               "apt-get": f"#!/bin/sh\necho \"$*\" >> {tmp / 'apt.log'}\n"}
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def setup(repo: Path, rc: int = 0, local: bool = True, uname: str = "Linux", gpu: bool = False,
          args: tuple = (), **env_vars) -> subprocess.CompletedProcess:
    env = dict(os.environ, FAKE_PIP_RC=str(rc), FAKE_LOCAL_RC="0" if local else "1", **env_vars)
    if "DBRX_LAB_TORCH" not in env_vars:
        env.pop("DBRX_LAB_TORCH", None)
    env["PATH"] = f"{fake_bin(repo.parent, uname, gpu)}:{env['PATH']}"
    return subprocess.run(["bash", str(repo / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=60)


def pip_calls(repo: Path) -> list[str]:
    log = repo / ".venv" / "calls.log"
    return [l for l in log.read_text().splitlines() if "pip" in l] if log.exists() else []


def torch_install(repo: Path) -> str:
    """The last `pip install torch==...` call (not the dry run)."""
    calls = [c for c in pip_calls(repo) if "torch==" in c and "--dry-run" not in c and "uninstall" not in c]
    assert calls, pip_calls(repo)
    return calls[-1]


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


# ---- issue #22 item 3: the torch build is chosen for the machine --------------------------------------------

def choice(tmp_path: Path, local: bool = False, uname: str = "Linux", gpu: bool = False, override=None):
    """Run torch_choice from scripts/torch_choice.sh with fakes; returns the completed process."""
    python = tmp_path / "py"
    python.write_text(FAKE_PYTHON.replace('"$(dirname "$0")/../calls.log"', "/dev/null"))
    python.chmod(0o755)
    env = dict(os.environ, FAKE_LOCAL_RC="0" if local else "1",
               PATH=f"{fake_bin(tmp_path, uname, gpu)}:{os.environ['PATH']}")
    env.pop("DBRX_LAB_TORCH", None)
    if override is not None:
        env["DBRX_LAB_TORCH"] = override
    return subprocess.run(["bash", "-c", f'. "{ROOT}/scripts/torch_choice.sh"; torch_choice "{python}"'],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("local, uname, gpu, override, want", [
    (True, "Linux", True, None, "local"),           # this project's machines: the local CPU wheel, GPU or not
    (False, "Linux", True, None, "cuda"),           # an NVIDIA GPU answers nvidia-smi: PyPI's CUDA build
    (False, "Linux", False, None, "cpu"),           # no GPU (nvidia-smi fails): PyTorch's CPU index
    (False, "Darwin", False, None, "pypi"),         # macOS: PyPI's wheel (no CUDA build exists)
    (True, "Linux", False, "cuda", "cuda"),         # the override wins over everything
    (False, "Linux", True, "cpu", "cpu"),
    (False, "Linux", False, "https://download.pytorch.org/whl/cu128", "https://download.pytorch.org/whl/cu128"),
])
def test_torch_choice_order(tmp_path, local, uname, gpu, override, want):
    done = choice(tmp_path, local, uname, gpu, override)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == want


def test_torch_choice_rejects_unknown_override(tmp_path):
    done = choice(tmp_path, override="gpu")
    assert done.returncode == 2
    assert "DBRX_LAB_TORCH='gpu'" in done.stderr and "cpu, cuda, local, pypi" in done.stderr


@pytest.mark.parametrize("local, gpu, index", [(True, False, None), (False, True, None), (False, False, CPU_INDEX)])
def test_setup_installs_the_chosen_build(repo, local, gpu, index):
    done = setup(repo, local=local, gpu=gpu)
    assert done.returncode == 0, done.stderr
    call = torch_install(repo)
    assert "torch==2.13.0" in call
    if index:
        assert f"--index-url {index}" in call
    else:
        assert "--index-url" not in call          # the local wheel (pip's find-links) or PyPI's CUDA build
    assert (repo / ".venv" / ".dbrx-lab-torch").read_text().strip() == ("local" if local else "cuda" if gpu else "cpu")


def test_setup_rejects_bad_override_before_installing_torch(repo):
    done = setup(repo, DBRX_LAB_TORCH="rocm")
    assert done.returncode == 2 and "DBRX_LAB_TORCH='rocm'" in done.stderr
    assert not any("torch==" in c and "--dry-run" not in c for c in pip_calls(repo))
    assert not (repo / ".venv" / ".dbrx-lab-setup").exists()


def test_asking_for_another_build_reinstalls_torch(repo):
    assert setup(repo).returncode == 0                                       # local wheel
    n = len(pip_calls(repo))
    assert setup(repo, DBRX_LAB_TORCH="local").returncode == 0               # the same build: nothing to do
    assert len(pip_calls(repo)) == n
    done = setup(repo, DBRX_LAB_TORCH="cpu")
    assert done.returncode == 0, done.stderr
    new = pip_calls(repo)[n:]
    assert any("uninstall" in c and "torch" in c for c in new), new          # 2.13.0+cpu satisfies ==2.13.0
    assert f"--index-url {CPU_INDEX}" in torch_install(repo)
    assert setup(repo).returncode == 0 and len(pip_calls(repo)) == len(new) + n     # no override: up to date


def test_browser_setup_without_apt_says_what_to_install(repo, tmp_path):
    """macOS (no apt-get): set-up succeeds and says how to get Chromium for the browser tests."""
    done = setup(repo, uname="Darwin", args=("--browser",), DBRX_LAB_CHROMIUM=str(tmp_path / "no-chromium"))
    assert done.returncode == 0, done.stderr
    assert "brew install --cask chromium" in done.stderr and "DBRX_LAB_CHROMIUM" in done.stderr
    assert not (tmp_path / "apt.log").exists()
    assert "--index-url" not in torch_install(repo)          # the local wheel here; pypi on a real Mac


# ---- issue #22 items 2 and 4: `make lab` serves a working copy; LAB_ARGS reach jupyter lab -----------------

def _lab_module():
    spec = importlib.util.spec_from_file_location("dbrx_lab_launcher", ROOT / "scripts" / "lab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _notebook(outputs: bool) -> dict:
    cell = {"cell_type": "code", "id": "c1", "metadata": {"execution": {"iopub.status.busy": "x"}},
            "source": "print(1)", "execution_count": 3 if outputs else None,
            "outputs": [{"output_type": "display_data", "data": {"text/plain": "x" * 5000}, "metadata": {}}]
            if outputs else []}
    check = {"cell_type": "code", "id": "c2", "metadata": {}, "source": "# NBVAL_CHECK_OUTPUT\nprint(2)",
             "execution_count": 1, "outputs": [{"output_type": "stream", "name": "stdout", "text": "2\n"}]}
    meta = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
            "language_info": {"name": "python"}}
    if outputs:
        meta["language_info"] = {"name": "python", "version": "3.11.7", "mimetype": "text/x-python"}
        meta["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}}}
    return {"cells": [cell, check], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}


def test_make_lab_serves_a_working_copy_with_lab_args(tmp_path):
    """`make lab` must not open JupyterLab on the tracked notebooks/ (it autosaves outputs into them)."""
    done = subprocess.run(["make", "-n", "lab", 'LAB_ARGS=--port 8890 --ip 0.0.0.0 --no-browser'], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    launch = [l for l in done.stdout.splitlines() if "jupyter" in l or "lab.py" in l]
    assert launch and all("notebooks" not in l for l in launch), done.stdout
    assert "--port 8890 --ip 0.0.0.0 --no-browser" in launch[-1]
    printed = subprocess.run([sys.executable, str(ROOT / "scripts" / "lab.py"), "--print-command",
                              "--dir", str(tmp_path / "copy"), "--port", "8890"],
                             capture_output=True, text=True, timeout=60)
    assert printed.returncode == 0, printed.stderr
    command = printed.stdout.strip().splitlines()[-1]
    assert f"--ServerApp.root_dir={tmp_path / 'copy'}" in command and command.endswith("--port 8890")
    assert sorted(p.name for p in (tmp_path / "copy").glob("*.ipynb")) == \
        sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))


def test_working_copy_never_overwrites_edits(tmp_path):
    lab = _lab_module()
    src, dest = tmp_path / "notebooks", tmp_path / "copy"
    src.mkdir()
    (src / "01_a.ipynb").write_text("v1")
    (src / "02_b.ipynb").write_text("b1")
    assert lab.sync_working_copy(src, dest) == ["copied 01_a.ipynb", "copied 02_b.ipynb"]
    (dest / "02_b.ipynb").write_text("my edits")                     # the user ran / edited notebook 02
    (dest / "mine.ipynb").write_text("my own notebook")
    (src / "01_a.ipynb").write_text("v2")                            # upstream changed both
    (src / "02_b.ipynb").write_text("b2")
    notes = lab.sync_working_copy(src, dest)
    assert (dest / "01_a.ipynb").read_text() == "v2"                 # unedited copy follows
    assert (dest / "02_b.ipynb").read_text() == "my edits"           # edited copy kept, with a note
    assert any("02_b.ipynb" in n and "lab-reset" in n for n in notes), notes
    notes = lab.reset_working_copy(src, dest)
    assert (dest / "02_b.ipynb").read_text() == "b2"
    backups = list((dest / ".backup").glob("*/02_b.ipynb"))
    assert len(backups) == 1 and backups[0].read_text() == "my edits"
    assert (dest / "mine.ipynb").read_text() == "my own notebook"    # not the project's file: untouched
    with pytest.raises(ValueError, match="outside the tracked folder"):
        lab.sync_working_copy(src, src / "sub")


def test_pre_save_hook_keeps_tracked_notebooks_stripped(tmp_path):
    """Saving through Jupyter's contents manager into notebooks/ stores no outputs, widget state or
    language_info details (the check cell keeps its small text output); elsewhere everything is kept."""
    from jupyter_server.services.contents.filemanager import FileContentsManager

    lab = _lab_module()
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "copy").mkdir()
    cm = FileContentsManager(root_dir=str(tmp_path))
    cm.pre_save_hook = lab.make_pre_save_hook(tmp_path / "notebooks")
    for path in ("notebooks/01_x.ipynb", "copy/01_x.ipynb"):
        cm.save({"type": "notebook", "content": _notebook(outputs=True)}, path)
    tracked = json.loads((tmp_path / "notebooks" / "01_x.ipynb").read_text())
    first, check = tracked["cells"]
    assert first["outputs"] == [] and first["execution_count"] is None and "execution" not in first["metadata"]
    assert check["outputs"] and "".join(check["outputs"][0]["text"]) == "2\n"
    assert tracked["metadata"]["language_info"] == {"name": "python"} and "widgets" not in tracked["metadata"]
    copy = json.loads((tmp_path / "copy" / "01_x.ipynb").read_text())
    assert copy["cells"][0]["outputs"] and copy["metadata"]["widgets"]
