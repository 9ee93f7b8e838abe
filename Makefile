# Two commands on a fresh machine:
#   make run    the example app on SQLite, monitoring live at http://127.0.0.1:8000/metrics
#   make test   every check: ruff, mypy, the test suite on SQLAlchemy 2.1 and again on 2.0
PYTHON ?= python3
VENV ?= .venv
VENV20 ?= .venv-sqlalchemy20

.PHONY: run load test lint bench wheel-smoke

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]' 'sqlalchemy>=2.1,<2.2'
	touch $@

# The library's own tests again on the 2.0 series, which many services still run.
$(VENV20)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV20)
	$(VENV20)/bin/pip install --quiet --upgrade pip
	$(VENV20)/bin/pip install --quiet -e '.[test]' 'sqlalchemy>=2.0,<2.1'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/python -m example_app

# The example app's load generator, against `make run` in another terminal.
load: $(VENV)/.installed
	$(VENV)/bin/python -m example_app.loadgen --duration 30

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: lint $(VENV20)/.installed
	$(VENV)/bin/pytest
	$(VENV20)/bin/pytest -m "not e2e" tests/test_core.py tests/test_api.py tests/test_concurrency.py tests/test_postgres.py tests/test_tracing.py tests/test_first_law.py tests/test_holders.py tests/test_pitfalls.py

# The built wheel alone in a new venv, used from outside the checkout (.ci/wheel_smoke.sh).
wheel-smoke: $(VENV)/.installed
	PYTHON=$(VENV)/bin/python bash .ci/wheel_smoke.sh

bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks
