"""route-stats on torch.distributed (issue 19): several processes (gloo on the CPU, started with the launcher's
environment variables, or torchrun with two simulated nodes) give the folder one process gives, file for file;
a killed rank is resumed with another number of processes; a bad line or a failing rank stops every rank."""
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dbrx_lab import analysis, cli

rs = importlib.import_module("dbrx_lab.route_stats")
ROOT = Path(__file__).resolve().parents[1]
WORDS = "the cat sat on a mat while dogs ran in the park and birds sang over trees".split()
ARGS = ["--model", "tiny-vocab", "--batch-size", "3", "--part-tokens", "40", "--min-count", "2"]

# a rank of the job: optional fault injection (TEST_FAULT=kind:rank:call), then the CLI
RUNNER = """
import importlib, os, signal, sys
import torch
torch.set_num_threads(1)
from dbrx_lab import cli
rs = importlib.import_module("dbrx_lab.route_stats")
kind, rank, at = (os.environ.get("TEST_FAULT") or "none:-1:0").split(":")
if int(os.environ.get("RANK", "0")) == int(rank):
    original, calls = rs._route_batch, []
    def patched(model, tok, items, *args):
        calls.append(1)
        if len(calls) == int(at):
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise ValueError(f"text at line {items[0].line}: boom")
        return original(model, tok, items, *args)
    rs._route_batch = patched
sys.exit(cli.main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def texts(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(2, 14))) for _ in range(n)]


def write_jsonl(path, items):
    path.write_text("".join(json.dumps({"text": t, "label": "ab"[i % 3 == 0]}) + "\n" for i, t in enumerate(items)))
    return path


def env(**extra) -> dict:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                          "MASTER_PORT", "TEST_FAULT")}
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **{k: str(v) for k, v in extra.items()})
    return e


def launch(n: int, data, out, *extra, fault: str = "", timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """n ranks started as torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    port = free_port()
    argv = ["route-stats", *ARGS, "--data", str(data), "--out", str(out), *extra]
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER, *argv], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE,
                              env=env(RANK=r, WORLD_SIZE=n, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                                      TEST_FAULT=fault))
             for r in range(n)]
    done = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def files(folder: Path) -> dict[str, bytes]:
    """Every routing part and aggregate table, by name (bytes), and the manifest's parts and progress."""
    got = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.parquet"))}
    manifest = json.loads((folder / "manifest.json").read_text())
    got["manifest"] = json.dumps({k: manifest[k] for k in ("parts", "texts_done", "tokens_done", "texts_sha256")})
    return got


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A labelled corpus and its single-process route-stats folder (no launcher)."""
    root = tmp_path_factory.mktemp("dist")
    data = write_jsonl(root / "d.jsonl", texts(40))
    ref = root / "ref"
    assert "WORLD_SIZE" not in os.environ
    assert cli.main(["route-stats", *ARGS, "--data", str(data), "--out", str(ref), "--no-progress"]) == 0
    assert len(json.loads((ref / "manifest.json").read_text())["parts"]) >= 6
    return data, ref


def test_two_processes_write_what_one_process_writes(corpus, tmp_path):
    data, ref = corpus
    out = tmp_path / "out"
    r0, r1 = launch(2, data, out)
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr, r1.stderr)
    assert files(out) == files(ref)                       # every part and table, byte for byte
    pd.testing.assert_frame_equal(analysis.load_routing(out), analysis.load_routing(ref))
    assert "40 texts" in r0.stdout and r1.stdout == ""    # one result line, from rank 0
    assert "route-stats" in r0.stderr and "route-stats" not in r1.stderr       # one progress bar (rank 0)
    logs = {r: (out / "logs" / f"rank-0000{r}.log").read_text() for r in (0, 1)}
    assert all("committed part-" in logs[r] and f"rank {r}/2" in logs[r] for r in (0, 1))   # both routed parts
    assert not list((out / "routing").glob("*.json"))      # every rank's commit record moved into the manifest
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


def test_killed_rank_resumes_with_another_number_of_processes(corpus, tmp_path, monkeypatch):
    data, ref = corpus
    out = tmp_path / "out"
    r0, r1 = launch(2, data, out, "--dist-timeout", "4", fault="kill:1:4")       # rank 1: kill -9 at its 4th batch
    assert r1.returncode == -9 and r0.returncode == 2
    assert "rerun the same command" in r0.stderr and "Traceback" not in r0.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    total = json.loads((ref / "manifest.json").read_text())["texts_done"]
    assert 0 < manifest["texts_done"] < total
    records = list((out / "routing").glob("part-*.json"))                           # rank 1's committed parts
    assert records
    (out / "routing" / "notes.txt").write_text("mine")                               # the user's file is kept
    calls = []
    original = rs._route_batch

    def counted(model, tok, items, *args):
        calls.append([it.index for it in items])
        return original(model, tok, items, *args)

    monkeypatch.setattr(rs, "_route_batch", counted)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli.main(["route-stats", *ARGS, "--data", str(data), "--out", str(out), "--no-progress"]) == 0   # N = 1
    routed = sorted(i for c in calls for i in c)
    assert len(routed) == len(set(routed)) and routed[0] >= manifest["texts_done"]
    committed = {i for r in records for i in range(*json.loads(r.read_text() if r.exists() else "{}")
                                                    .get("texts", [0, 0]))}
    assert not committed & set(routed)                                               # rank 1's parts were kept
    assert len(routed) < total - manifest["texts_done"]
    assert files(out) == files(ref)                                                  # every row exactly once
    assert (out / "routing" / "notes.txt").read_text() == "mine"

    # the other way: one process interrupted, resumed by two
    out = tmp_path / "out-1-2"

    def interrupted(model, tok, items, *args):
        if items[0].index >= 12:
            raise KeyboardInterrupt
        return original(model, tok, items, *args)

    monkeypatch.setattr(rs, "_route_batch", interrupted)
    assert cli.main(["route-stats", *ARGS, "--data", str(data), "--out", str(out), "--no-progress"]) == 130
    assert 0 < json.loads((out / "manifest.json").read_text())["texts_done"] <= 12
    r0, r1 = launch(2, data, out)
    assert r0.returncode == 0 and r1.returncode == 0, (r0.stderr, r1.stderr)
    assert files(out) == files(ref)


def test_bad_line_and_failing_rank_stop_every_rank(corpus, tmp_path):
    data, ref = corpus
    lines = data.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines[:30] + ['{"text": oops'] + lines[31:]) + "\n")
    r0, r1 = launch(2, bad, tmp_path / "out")
    assert (r0.returncode, r1.returncode) == (2, 2)
    assert "bad.jsonl:31: malformed JSON" in r0.stderr and "Traceback" not in r0.stderr + r1.stderr
    assert "stopped because rank 0 failed" in r1.stderr and "bad.jsonl:31" in r1.stderr
    kept = analysis.load_routing(tmp_path / "out")
    assert sorted(kept["text"].unique()) == list(range(30))                          # every text before it

    r0, r1 = launch(2, data, tmp_path / "out2", fault="raise:1:2")                 # rank 1 fails mid-run
    assert (r0.returncode, r1.returncode) == (2, 2)
    assert "boom" in r1.stderr and "stopped because rank 1 failed: text at line" in r0.stderr
    assert "Traceback" not in r0.stderr + r1.stderr

    foreign = tmp_path / "foreign"                                                   # issue 18's folder rules
    foreign.mkdir()
    (foreign / "load.parquet").write_bytes(b"someone else's")
    r0, r1 = launch(2, data, foreign)
    assert (r0.returncode, r1.returncode) == (2, 2)
    assert "never deletes or overwrites" in r0.stderr and "stopped because rank 0 failed" in r1.stderr
    assert os.listdir(foreign) == ["load.parquet"] and (foreign / "load.parquet").read_bytes() == b"someone else's"


def test_two_nodes_with_torchrun(corpus, tmp_path):
    """Two torchrun agents (--nnodes 2, a static rendezvous on localhost), one process each."""
    data, ref = corpus
    out = tmp_path / "out"
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "dbrx_lab.cli", "route-stats", *ARGS, "--data", str(data), "--out", str(out),
                               "--no-progress"],
                              cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for node in (0, 1)]
    results = [p.communicate(timeout=150) + (p.returncode,) for p in procs]
    assert [r[2] for r in results] == [0, 0], [r[1][-2000:] for r in results]
    assert files(out) == files(ref)
    assert (out / "logs" / "rank-00001.log").is_file()


def test_accelerate_launch(corpus, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` (accelerate's torchrun path; without a GPU the ranks
    run on the CPU with gloo) gives the single-process folder too."""
    data, ref = corpus
    out = tmp_path / "out"
    launcher = Path(sys.executable).with_name("accelerate")
    if not launcher.is_file():
        pytest.skip("accelerate's launcher is not installed beside this python")
    proc = subprocess.run([str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                           str(free_port()), "-m", "dbrx_lab.cli", "route-stats", *ARGS, "--data", str(data),
                           "--out", str(out), "--no-progress"],
                          cwd=ROOT, env=env(), text=True, capture_output=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert files(out) == files(ref)
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


def test_replica_devices_from_local_rank(monkeypatch):
    from dbrx_lab import distributed

    assert distributed.replica_devices(3, 0) == []                                    # the CPU
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 8)
    assert distributed.replica_devices(1, 4) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"local rank 2 .* needs GPUs 8..11, but 8 are visible: start at most 2"):
        distributed.replica_devices(2, 4)
    with pytest.raises(ValueError, match="dist_timeout must be > 0"):
        distributed.context(0)


def test_parts_are_balanced_by_tokens():
    parts = [rs._Part(i, i, i + 1, t, "", "") for i, t in enumerate([50, 10, 10, 10, 40, 5, 5, 30, 20, 20])]
    for world in (1, 2, 3):
        owners = rs._assign(parts, [True] * len(parts), world)
        load = [sum(p.tokens for p, o in zip(parts, owners) if o == r) for r in range(world)]
        assert sorted(set(owners)) == list(range(world)) and max(load) - min(load) <= max(p.tokens for p in parts)
    owners = rs._assign(parts, [i % 2 == 0 for i in range(len(parts))], 2)          # committed parts: no owner
    assert [o for i, o in enumerate(owners) if i % 2] == [-1] * 5 and set(owners[::2]) == {0, 1}


def test_manifest_merges_records_in_plan_order(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    manifest = rs._Manifest(out, {"s": 1}, resume=True)
    parts = [rs._Part(i, 3 * i, 3 * i + 3, 10 + i, f"sha{i}", f"after{i}") for i in range(3)]
    for part in parts[1:]:                                      # parts 1 and 2 committed by other ranks
        (out / "routing" / part.file).write_bytes(b"")
        rs._write_json(out / "routing" / (part.file[:-8] + ".json"),
                       {"texts": [part.start, part.stop], "tokens": part.tokens, "rows": 7, "sha256": part.sha})
    assert manifest.merge(parts) == 0                           # part 0 is missing: nothing moves
    (out / "routing" / parts[0].file).write_bytes(b"")
    assert manifest.merge(parts, known={parts[0].file: 5}) == 3  # its record is not visible yet: the gather's word
    state = json.loads((out / "manifest.json").read_text())
    assert [p["file"] for p in state["parts"]] == [p.file for p in parts]
    assert [p["rows"] for p in state["parts"]] == [5, 7, 7]
    assert state["texts_done"] == 9 and state["tokens_done"] == 33 and state["texts_sha256"] == "after2"
    assert not list((out / "routing").glob("*.json"))
