# The two commands a newcomer needs (see README):
#   make lab    set up .venv and open JupyterLab on notebooks/ (bundled demo model, offline)
#   make test   set up .venv (+ Debian's chromium) and run the whole test suite, notebooks and browser included
.PHONY: lab test bench setup

setup:
	./scripts/setup.sh

lab:
	./scripts/setup.sh
	.venv/bin/jupyter lab notebooks/ $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

test:
	./scripts/setup.sh --browser
	.venv/bin/python -m pytest

bench:
	./scripts/setup.sh
	.venv/bin/python benchmarks/bench.py
