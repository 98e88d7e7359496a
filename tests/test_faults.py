"""Fault tests (issue 18): kill -9 in the middle of save_pretrained, Trace.save and route-stats; a full disk
(a small tmpfs, where this process may mount one; skipped otherwise); a read-only folder.

After any of them, what was committed before is intact and loads, no temporary is left once the next save
ran, and a rerun finishes with the same result as an undisturbed run.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from dbrx_lab import Trace, analysis, cli, load_model

pytestmark = pytest.mark.slow
WORDS = "the cat sat on a mat while dogs ran in the park".split()


def spawn(script: str) -> subprocess.Popen:
    """A Python child running `script`, which prints 'ready' before its first write."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])


def kill_after(proc: subprocess.Popen, delay: float) -> None:
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp" in p.name)


# --- kill -9 -----------------------------------------------------------------------------------------------
SAVE_LOOP = """
import sys, torch
from dbrx_lab import DbrxConfig, DbrxLM
cfg = DbrxConfig(d_model=128, n_heads=4, kv_n_heads=2, n_layers=4, ffn_hidden_size=512, max_seq_len=64,
                 vocab_size=512, torch_dtype="float32")
torch.manual_seed(0)
model = DbrxLM(cfg)
print("ready", flush=True)
while True:
    model.save_pretrained(sys.argv[1] if len(sys.argv) > 1 else {folder!r}, max_shard_size="4MB")
"""


def test_kill_during_save_pretrained(tmp_path):
    folder = tmp_path / "ckpt"
    reference = None
    for delay in (0.2, 0.7):
        kill_after(spawn(SAVE_LOOP.format(folder=str(folder))), delay)
        if folder.exists():                                # every kill leaves the old or the new checkpoint
            state = {k: v.clone() for k, v in load_model(folder).state_dict().items()}
            if reference is not None:
                assert all(torch.equal(state[k], reference[k]) for k in reference)
            reference = state
    load_model(folder).save_pretrained(folder, max_shard_size="4MB")
    assert temporaries(tmp_path) == []                    # the completed save swept the killed ones' folders
    load_model(folder)


TRACE_LOOP = """
import torch
from dbrx_lab import Trace
t = Trace(input_ids=torch.zeros(1, 64, dtype=torch.long), attention_mask=torch.ones(1, 64, dtype=torch.bool),
          tokens=[["x"] * 64], prompt_length=64, activations={{"blocks.0.hook_resid_post": torch.ones(1, 64, 2 ** 18)}})
print("ready", flush=True)
for i in range({n}):
    t.activations["blocks.0.hook_resid_post"].fill_(i)
    t.save({path!r})
"""


def test_kill_during_trace_save(tmp_path):
    path = tmp_path / "t.safetensors"
    for delay in (0.1, 0.6):
        kill_after(spawn(TRACE_LOOP.format(n=10 ** 6, path=str(path))), delay)
        if path.exists():                                  # a complete trace (some save's), never a torn one
            assert len(Trace.load(path).activations["blocks.0.hook_resid_post"].unique()) == 1
    trace = Trace.load(path)
    trace.save(path)
    assert temporaries(tmp_path) == []                    # the next save swept the killed saves' temporaries
    assert Trace.load(path).allclose(trace)


def write_texts(path: Path, n: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, size=rng.integers(3, 30)))}) + "\n"
                            for _ in range(n)))
    return path


def route_cli(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dbrx_lab.cli", "route-stats", "--model", "tiny-vocab", "--data", str(data),
            "--out", str(out), "--batch-size", "4", "--no-progress", "--no-predictions", "--min-count", "1", *extra]


def test_kill_during_route_stats_resumes_to_the_same_tables(tmp_path, monkeypatch):
    rs_mod = importlib.import_module("dbrx_lab.route_stats")
    data = write_texts(tmp_path / "d.jsonl", 80)
    monkeypatch.setattr(rs_mod, "PART_TOKENS", 60)
    assert cli.main(route_cli(data, tmp_path / "clean")[3:]) == 0
    out = tmp_path / "out"
    runner = ("import sys, importlib, torch; torch.set_num_threads(1); "
              "importlib.import_module('dbrx_lab.route_stats').PART_TOKENS = 60; "
              "from dbrx_lab import cli; sys.exit(cli.main(sys.argv[1:]))")
    proc = subprocess.Popen([sys.executable, "-c", runner, *route_cli(data, out)[3:]])
    manifest = out / "manifest.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:          # kill once a part is committed
        if manifest.is_file() and len(json.loads(manifest.read_text() or "{}").get("parts", [])) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = json.loads(manifest.read_text())["texts_done"]
    assert 0 < done < 80, done
    assert cli.main(route_cli(data, out)[3:]) == 0                       # resumes after the committed texts
    assert not [p for p in (out / "routing").iterdir() if p.name.endswith(".tmp")]
    pd.testing.assert_frame_equal(analysis.load_routing(out), analysis.load_routing(tmp_path / "clean"), atol=1e-5)
    for table in ("load", "coactivation", "transitions"):
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "clean" / f"{table}.parquet"), atol=1e-5)


# --- a full disk -------------------------------------------------------------------------------------------
def mount_tmpfs(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs (skipped where it cannot be mounted)."""
    path = tmp_path / "disk"
    mount_tmpfs(path, "size=3m")
    yield path
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_keeps_earlier_saves(small_disk, tiny_model, make_ids):
    _, small = tiny_model.run_with_trace(make_ids(1, 4))
    path = small.save(small_disk / "t.safetensors")
    big = Trace(input_ids=torch.zeros(1, 8, dtype=torch.long), attention_mask=torch.ones(1, 8, dtype=torch.bool),
                tokens=[["x"] * 8], prompt_length=8, activations={"blocks.0.hook_resid_post": torch.ones(1, 8, 2 ** 17)})
    with pytest.raises(OSError) as err:
        big.save(path)
    assert err.value.errno == errno.ENOSPC
    assert Trace.load(path).allclose(small) and temporaries(small_disk) == []
    folder = tiny_model.save_pretrained(small_disk / "ckpt")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2 ** 20 - 2 * sum(map(len, before.values())) - 2 ** 15))
    with pytest.raises(OSError) as err:
        tiny_model.save_pretrained(folder, max_shard_size="100KB")
    assert err.value.errno == errno.ENOSPC
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before and temporaries(small_disk) == []


def test_full_disk_route_stats_reports_one_line_and_resumes(small_disk, tmp_path, capsys, monkeypatch):
    rs_mod = importlib.import_module("dbrx_lab.route_stats")

    monkeypatch.setattr(rs_mod, "PART_TOKENS", 200)
    data = write_texts(tmp_path / "d.jsonl", 120, seed=1)
    args = route_cli(data, tmp_path / "clean")[3:]
    assert cli.main(args) == 0
    size = sum(p.stat().st_size for p in (tmp_path / "clean").rglob("*") if p.is_file())
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (3 * 2 ** 20 - size // 2))           # room for about half of the output
    out = small_disk / "out"
    capsys.readouterr()
    assert cli.main(route_cli(data, out)[3:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk is full" in err[0], err
    committed = json.loads((out / "manifest.json").read_text())["parts"]
    assert committed and all((out / "routing" / p["file"]).is_file() for p in committed)
    filler.unlink()
    assert cli.main(route_cli(data, out)[3:]) == 0
    pd.testing.assert_frame_equal(analysis.load_routing(out), analysis.load_routing(tmp_path / "clean"))


# --- a read-only folder -------------------------------------------------------------------------------------
@pytest.fixture
def readonly_dir(tmp_path):
    """A read-only folder: a read-only tmpfs as root (permissions do not stop root), else mode 0555."""
    path = tmp_path / "ro"
    if os.geteuid() == 0:
        mount_tmpfs(path, "ro,size=1m")
        yield path
        subprocess.run(["umount", "-l", str(path)], check=False)
    else:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)


def test_read_only_folder(readonly_dir, tiny_model, make_ids, tmp_path, capsys):
    _, trace = tiny_model.run_with_trace(make_ids(1, 4))
    with pytest.raises(OSError) as err:
        trace.save(readonly_dir / "t.safetensors")
    assert err.value.errno in (errno.EROFS, errno.EACCES)
    with pytest.raises(OSError):
        tiny_model.save_pretrained(readonly_dir / "ckpt")
    assert list(readonly_dir.iterdir()) == []
    data = write_texts(tmp_path / "d.jsonl", 4)
    assert cli.main(route_cli(data, readonly_dir / "out")[3:]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "ro/out" in err[0] and ("read-only" in err[0] or "permission denied" in err[0]), err
