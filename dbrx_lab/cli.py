"""`dbrx-lab` command line: each sub-command lives next to the code it runs."""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

# name -> (module with `add_arguments(parser)` and `run(args) -> int`, one-line help)
COMMANDS = {
    "train-demo": ("dbrx_lab.train", "train the bundled demo model (about 30 minutes on 2 CPU cores)"),
    "route-stats": ("dbrx_lab.route_stats", "stream a text dataset through a model and write routing tables"),
    "report": ("dbrx_lab.report", "write a self-contained HTML report of routing and attention for a prompt"),
    "cards": ("dbrx_lab.card_site", "write expert cards (top contexts, logit effects, partners, ablation) as an offline HTML site"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbrx-lab", description="dbrx-lab: interpretability workbench for DBRX")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        modules[name] = module
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except ValueError as err:                   # bad input: the message names the file, line or field
        return _fail(args.command, str(err))
    except OSError as err:                      # missing, unwritable or full: one line, nothing committed lost
        return _fail(args.command, describe_os_error(err))
    except KeyboardInterrupt:
        return _fail(args.command, "interrupted; what was committed is kept (run the same command to resume "
                                   "where that applies)", code=130)


def _fail(command: str, message: str, code: int = 2) -> int:
    """Report a user error as one line on stderr (no traceback) -> the exit code."""
    line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"dbrx-lab {command}: error: {line}", file=sys.stderr)
    return code


_OS_HINTS = {
    errno.ENOSPC: "the disk is full: free space or choose another --out; committed work is kept and a rerun "
                  "resumes from it",
    errno.EDQUOT: "the disk quota is exceeded: free space or choose another --out; committed work is kept",
    errno.EACCES: "permission denied: choose a folder you can write (or read) or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you can write or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another --out",
    errno.EEXIST: "a file is in the way: --out must be a folder",
    errno.ENOTDIR: "a file is in the way where a folder is needed: check the path",
    errno.EISDIR: "a folder is where a file is needed: check the path",
    errno.ENOENT: "no such file or folder: check the path",
}


def describe_os_error(err: OSError) -> str:
    """One line for an OSError: the path, what went wrong and what to do."""
    code = err.errno
    if code is None and "No space left on device" in str(err):     # pyarrow's errors carry no errno
        code = errno.ENOSPC
    where = "" if err.filename is None else str(err.filename)
    if err.filename2 is not None:
        where = f"{where} -> {err.filename2}"
    what = _OS_HINTS.get(code) or err.strerror or str(err)
    if code in _OS_HINTS and not where and err.strerror is None:
        what = f"{err} ({what})"
    return f"{where}: {what}" if where else what


if __name__ == "__main__":
    sys.exit(main())
