# On a fresh machine:
#   make run       the example app on SQLite, monitoring live at http://127.0.0.1:8000/metrics
#   make test      ruff, mypy, and the library's tests (all but those marked slow) on the newest
#                  versions of everything and again on the oldest pyproject.toml allows
#                  (constraints/*.txt): about 3 minutes on 2 cores
#   make test-all  what CI runs: every test on both ends, the slow ones too, and the docs built
#                  strict: about 16 minutes (docs/development.md)
PYTHON ?= python3
# The oldest end runs on the oldest Python pyproject.toml declares, where the machine has it
# (pyenv's 3.10 here); elsewhere on $(PYTHON), with a line that says so.
PYTHON_OLDEST ?= $(or $(shell for p in python3.10 $$(pyenv root 2>/dev/null)/versions/3.10*/bin/python3.10; do \
	"$$p" -c 'import sys' 2>/dev/null && { echo "$$p"; break; }; done),$(PYTHON))
VENV ?= .venv
OLDEST ?= .venv-oldest

.PHONY: run load test test-all lint docs bench wheel-smoke

# The newest end: FastAPI, Starlette, SQLAlchemy 2.1, SQLModel, the drivers, OpenTelemetry.
$(VENV)/.installed: pyproject.toml constraints/newest.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints/newest.txt -e '.[dev]'
	touch $@

# The oldest end: each dependency at its declared floor (SQLAlchemy 2.0, FastAPI 0.110 with its
# Starlette, OpenTelemetry 1.30, ...). The test extra only: the dev tools need newer releases.
$(OLDEST)/.installed: pyproject.toml constraints/oldest.txt
	@$(PYTHON_OLDEST) -c 'import sys; v = sys.version_info[:2]; v == (3, 10) or print(f"no Python 3.10 here: the oldest end runs on {v[0]}.{v[1]}")'
	rm -rf $(OLDEST)
	$(PYTHON_OLDEST) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet -c constraints/oldest.txt -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/python -m example_app

# The example app's load generator, against `make run` in another terminal.
load: $(VENV)/.installed
	$(VENV)/bin/python -m example_app.loadgen --duration 30

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Modules the oldest end cannot even import: their dev-only dependencies are not installed there.
NOT_ON_OLDEST = --ignore=tests/test_dashboard_otel_forms.py --ignore=tests/test_diagnostics_browser.py

# Both ends, less the tests marked slow: SQLAlchemy's own suite and FastAPI's tutorials, each run
# bare and monitored (tests/upstream/, tests/fastapi_tutorials/), the benchmarks' quick run, the
# end-to-end tests against a real Prometheus, and the headless-browser test.
test: lint $(OLDEST)/.installed
	$(VENV)/bin/pytest -m "not slow"
	$(OLDEST)/bin/pytest -m "not slow" $(NOT_ON_OLDEST)

# Everything: the whole suite on the newest end, then on the oldest less three things:
# SQLAlchemy's own suite (minutes more, on the same bed), test_dashboard_otel_forms.py
# (OpenTelemetry's Prometheus exporter needs an SDK far above the floor) and the browser test
# (selenium is a dev tool; the page is the same).
test-all: lint docs $(OLDEST)/.installed
	$(VENV)/bin/pytest
	$(OLDEST)/bin/pytest -m "not upstream" $(NOT_ON_OLDEST)

# The documentation site (mkdocs.yml, docs/) into site/; strict: a broken link or anchor, or a
# page missing from the nav, fails it.
docs: $(VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# The built wheel alone in a new venv, used from outside the checkout (.ci/wheel_smoke.sh).
wheel-smoke: $(VENV)/.installed
	PYTHON=$(VENV)/bin/python bash .ci/wheel_smoke.sh

bench: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks

# grafana/dashboards/session_monitor.json and its packaged copy, built with Grafana's foundation
# SDK (grafana/build_dashboard.py); commit both.
.PHONY: dashboard
dashboard: $(VENV)/.installed
	$(VENV)/bin/python grafana/build_dashboard.py
