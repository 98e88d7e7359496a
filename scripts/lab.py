"""`make lab`: open JupyterLab on a working copy of the notebooks, so the tracked notebooks/ stay pristine.

    .venv/bin/python scripts/lab.py [--dir lab] [--reset] [--print-command] [JUPYTER LAB ARGS ...]

JupyterLab saves outputs, widget state and kernel metadata into every notebook you run (autosave included).
Served from notebooks/ it would rewrite the tracked files (issue #22 item 2), so the lab serves a working copy
instead: `lab/` (gitignored; `--dir` or `make lab LAB_DIR=...` for another folder), created from notebooks/
when absent. Rules for the copy, which never lose your work:
  - a notebook missing from the copy is copied in;
  - a copy you have not saved since it was made (same bytes as written) follows the tracked notebook;
  - a copy you edited is never overwritten: when the tracked notebook changed, a line says so, and
    `make lab-reset` (`--reset`) moves your edited copies to lab/.backup/<time>/ and copies the tracked ones.
As a second guard, a pre-save hook strips outputs from any notebook saved inside the tracked notebooks/ folder
(if you serve the repository root with LAB_ARGS, say). Anything after the options goes to `jupyter lab`
(`make lab LAB_ARGS="--port 8890 --ip 0.0.0.0 --no-browser"`).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACKED = ROOT / "notebooks"
MANIFEST = ".dbrx-lab-copies.json"          # name -> sha256 of the bytes this script wrote into the copy
CHECK = "# NBVAL_CHECK_OUTPUT"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sources(src: Path) -> list[Path]:
    """The files of the tracked folder that the working copy holds (top level, not hidden)."""
    return sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith("."))


def _copy(src: Path, dest: Path) -> None:
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def _load_manifest(dest: Path) -> dict[str, str]:
    try:
        return json.loads((dest / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}


def _save_manifest(dest: Path, manifest: dict[str, str]) -> None:
    tmp = dest / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, dest / MANIFEST)


def sync_working_copy(src: Path, dest: Path) -> list[str]:
    """Bring the working copy `dest` up to date with `src` without touching a file the user edited.

    Returns one line per notebook copied, updated or left behind (edited here, changed upstream)."""
    if dest.resolve() == src.resolve() or dest.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"the working copy {dest} must be outside the tracked folder {src}")
    dest.mkdir(parents=True, exist_ok=True)
    manifest, notes = _load_manifest(dest), []
    for path in _sources(src):
        target, want = dest / path.name, _sha(path)
        if not target.exists():
            _copy(path, target)
            manifest[path.name] = want
            notes.append(f"copied {path.name}")
            continue
        have = _sha(target)
        if have == want:
            manifest[path.name] = want
        elif manifest.get(path.name) == have:         # our own unedited copy: follow the tracked notebook
            _copy(path, target)
            manifest[path.name] = want
            notes.append(f"updated {path.name} (you had not edited it)")
        elif manifest.get(path.name) != want:          # edited here, and the tracked notebook changed
            notes.append(f"kept your edited {target}; {path} has changed since it was copied "
                         f"(`make lab-reset` takes the new version and keeps yours in {dest / '.backup'})")
    _save_manifest(dest, manifest)
    return notes


def reset_working_copy(src: Path, dest: Path) -> list[str]:
    """Replace every copy that differs from the tracked notebook; the old copies move to dest/.backup/<time>/."""
    sync_working_copy(src, dest)
    manifest, notes = _load_manifest(dest), []
    backup = dest / ".backup" / time.strftime("%Y%m%d-%H%M%S")
    for path in _sources(src):
        target = dest / path.name
        if _sha(target) != _sha(path):
            backup.mkdir(parents=True, exist_ok=True)
            os.replace(target, backup / path.name)
            _copy(path, target)
            notes.append(f"reset {path.name} (your copy is in {backup / path.name})")
        manifest[path.name] = _sha(path)
    _save_manifest(dest, manifest)
    return notes


def strip_notebook(model: dict, on_disk: dict | None = None) -> None:
    """Strip a notebook model in place as the tracked notebooks are committed: no outputs or execution counts
    (cells marked # NBVAL_CHECK_OUTPUT keep their plain-text output, taken from `on_disk` when the new one is
    missing), no widget state, language_info reduced to its name, no execution timings."""
    meta = model.setdefault("metadata", {})
    meta.pop("widgets", None)
    if isinstance(meta.get("language_info"), dict):
        meta["language_info"] = {"name": meta["language_info"].get("name", "python")}
    stored = {}
    for cell in (on_disk or {}).get("cells", []):
        if cell.get("cell_type") == "code":
            stored["".join(cell.get("source", ""))] = cell
    for cell in model.get("cells", []):
        cell.get("metadata", {}).pop("execution", None)
        if cell.get("cell_type") != "code":
            continue
        source = "".join(cell.get("source", ""))
        if CHECK in source:
            outs = cell.get("outputs") or []
            if not outs or not all(o.get("output_type") == "stream" for o in outs):
                old = stored.get(source)
                cell["outputs"] = old.get("outputs", []) if old else []
                cell["execution_count"] = old.get("execution_count") if old else None
        else:
            cell["outputs"], cell["execution_count"] = [], None


def make_pre_save_hook(tracked: Path):
    """A Jupyter ContentsManager pre-save hook that strips notebooks saved inside `tracked` (strip_notebook)."""
    tracked = Path(tracked).resolve()

    def strip_tracked_outputs(model, path, contents_manager, **kwargs):
        if model.get("type") != "notebook" or not isinstance(model.get("content"), dict):
            return
        os_path = Path(contents_manager.root_dir, path.lstrip("/")).resolve()
        if not os_path.is_relative_to(tracked):
            return
        try:
            on_disk = json.loads(os_path.read_text())
        except (OSError, ValueError):
            on_disk = None
        strip_notebook(model["content"], on_disk)
        contents_manager.log.info("dbrx-lab: stripped outputs of tracked notebook %s before saving", path)

    return strip_tracked_outputs


strip_tracked_outputs = make_pre_save_hook(TRACKED)


def jupyter_args(dest: Path, extra: list[str]) -> list[str]:
    """The `jupyter lab` arguments: serve `dest`; the user's own arguments last, so they win."""
    root_options = ("--ServerApp.root_dir", "--notebook-dir", "--ServerApp.notebook_dir", "--root-dir")
    chosen = any(a.split("=")[0] in root_options for a in extra)       # the user serves another folder
    args = [] if chosen else [f"--ServerApp.root_dir={dest}"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--allow-root")
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        args.append("--no-browser")                 # headless: JupyterLab would only say "No web browser found"
    return args + list(extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=os.environ.get("LAB_DIR") or "lab",
                        help="working copy of notebooks/ that JupyterLab serves (default: lab/, gitignored)")
    parser.add_argument("--reset", action="store_true",
                        help="replace edited copies by the tracked notebooks (old ones kept in DIR/.backup/) and exit")
    parser.add_argument("--print-command", action="store_true", help="print the jupyter lab command and exit")
    opts, extra = parser.parse_known_args(argv)
    dest = Path(opts.dir).expanduser()
    if not dest.is_absolute():
        dest = ROOT / dest
    try:
        notes = (reset_working_copy if opts.reset else sync_working_copy)(TRACKED, dest)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in notes:
        print(f"[dbrx-lab] {line}")
    if opts.reset:
        print(f"[dbrx-lab] {dest} matches notebooks/" + ("" if notes else " (nothing to reset)"))
        return 0
    args = jupyter_args(dest, extra)
    if opts.print_command:
        print(" ".join(["jupyter", "lab", *args]))
        return 0
    print(f"[dbrx-lab] serving the working copy {dest} (notebooks/ stays as committed; `make lab-reset` refreshes it)")
    if "--no-browser" in args:
        print("[dbrx-lab] no browser here: open the http://localhost:.../lab?token=... URL printed below; from "
              "another machine, tunnel first: ssh -L 8888:localhost:8888 THIS_HOST")
    from jupyterlab.labapp import LabApp

    # the hook as an import string (this file's folder is sys.path[0]): config passed to LabApp in Python
    # does not reach the server's contents manager
    hook = f"--ContentsManager.pre_save_hook={Path(__file__).stem}.strip_tracked_outputs"
    LabApp.launch_instance(argv=[hook, *args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
