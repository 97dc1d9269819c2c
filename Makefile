# The two commands of the README. Both create or refresh .venv first (scripts/setup_venv.sh).
.PHONY: demo test test-slow test-all venv lint

venv:
	bash scripts/setup_venv.sh

demo: venv
	.venv/bin/python scripts/demo.py $(ARGS)

# The test suite without the slow end-to-end cases (CI runs those next, timed separately).
test: venv
	.venv/bin/python -m pytest tests -m "not slow" $(ARGS)

# The slow end-to-end cases (a real model, fine-tuning, 8-device subprocesses, servers).
test-slow: venv
	.venv/bin/python -m pytest tests -m slow $(ARGS)

test-all: test test-slow

lint: venv
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
