# The two commands of the README. Both create or refresh .venv first (scripts/setup_venv.sh).
.PHONY: demo test venv lint

venv:
	bash scripts/setup_venv.sh

demo: venv
	.venv/bin/python scripts/demo.py $(ARGS)

test: venv
	.venv/bin/python -m pytest tests $(ARGS)

lint: venv
	.venv/bin/ruff check . && .venv/bin/ruff format --check .
