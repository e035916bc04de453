# The two commands a newcomer needs; both run the idempotent install first.
.PHONY: install demo test bench

install:
	@bash scripts/install.sh

demo: install
	.venv/bin/remote-hw demo

test: install
	.venv/bin/python -m pytest -rs

bench: install
	.venv/bin/python bench/roundtrip.py
