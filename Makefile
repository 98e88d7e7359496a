# The two commands a newcomer needs (see README):
#   make lab    set up .venv and open JupyterLab on lab/, a working copy of notebooks/ (bundled demo model, offline)
#   make test   set up .venv (+ Debian's chromium) and run the whole test suite, notebooks and browser included
# More:
#   make lab LAB_ARGS="--port 8890 --ip 0.0.0.0 --no-browser"   arguments for `jupyter lab` (headless / remote)
#   make lab LAB_DIR=~/dbrx-notebooks                           another working copy
#   make lab-reset     replace edited copies in lab/ by the tracked notebooks (yours move to lab/.backup/)
#   make screenshots   redraw docs/img/*.png from the widgets in JupyterLab + headless Chromium
#   make bench         CPU benchmark against HF transformers (benchmarks/README.md)
.PHONY: lab lab-reset test bench setup screenshots

LAB_ARGS ?=
LAB_DIR ?= lab

setup:
	./scripts/setup.sh

lab:
	./scripts/setup.sh
	.venv/bin/python scripts/lab.py --dir "$(LAB_DIR)" $(LAB_ARGS)

lab-reset:
	./scripts/setup.sh
	.venv/bin/python scripts/lab.py --dir "$(LAB_DIR)" --reset

test:
	./scripts/setup.sh --browser
	.venv/bin/python -m pytest

bench:
	./scripts/setup.sh
	.venv/bin/python benchmarks/bench.py

screenshots:
	./scripts/setup.sh --browser
	.venv/bin/python scripts/screenshots.py
