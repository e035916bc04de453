# The two commands a newcomer needs; both run the idempotent install first.
.PHONY: install demo test lint typecheck check bench fresh-check

install:
	@bash scripts/install.sh

demo: install
	.venv/bin/remote-hw demo

test: install
	.venv/bin/python -m pytest -rs

# The house's habits, run by CI after the tests (config in pyproject.toml).
lint: install
	.venv/bin/ruff check remote_hw tests bench scripts samples

typecheck: install
	.venv/bin/mypy

# Everything CI runs.
check: test lint typecheck

bench: install
	.venv/bin/python bench/roundtrip.py

# Rehearse CI: a fresh clone of the committed tree, a new .venv, the test command.
fresh-check:
	@bash scripts/fresh_check.sh
