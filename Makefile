# The two commands a newcomer needs; both run the idempotent install first.
.PHONY: install demo test lint typecheck check bench fuzz fresh-check

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

# The fuzz targets of tests/fuzz/ for longer than CI runs them (3 s each there), with a
# fresh seed each time; FUZZ_SECONDS=600 make fuzz for a long run. A failure prints its
# seed: REMOTE_HW_FUZZ_SEED=<seed> reproduces it.
FUZZ_SECONDS ?= 60
fuzz: install
	@seed=$$(od -An -N4 -tu4 /dev/urandom | tr -d ' '); echo "fuzz seed $$seed"; \
	REMOTE_HW_FUZZ_SECONDS=$(FUZZ_SECONDS) REMOTE_HW_FUZZ_SEED=$$seed \
	.venv/bin/python -m pytest -q -p no:cacheprovider --timeout=0 tests/fuzz

# Rehearse CI: a fresh clone of the committed tree, a new .venv, the test command.
fresh-check:
	@bash scripts/fresh_check.sh
