# The two commands a newcomer needs; both run the idempotent install first.
.PHONY: install demo test bench fresh-check

install:
	@bash scripts/install.sh

demo: install
	.venv/bin/remote-hw demo

test: install
	.venv/bin/python -m pytest -rs

bench: install
	.venv/bin/python bench/roundtrip.py

# Rehearse CI: a fresh clone of the committed tree, a new .venv, the test command.
fresh-check:
	@bash scripts/fresh_check.sh
