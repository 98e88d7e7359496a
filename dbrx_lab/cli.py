"""`dbrx-lab` command line: each sub-command lives next to the code it runs."""
from __future__ import annotations

import argparse
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
    except (ValueError, FileNotFoundError) as err:
        print(f"dbrx-lab {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
