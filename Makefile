# hearth: `make run` serves, `make test` passes, both from a fresh clone.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export HEARTH_REDIS_URL ?= redis://127.0.0.1:56379/0

.PHONY: run serve test stop clean lint services bench cluster cluster-stop

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

services: $(STAMP)
	$(PY) -m app services start

run: services
	$(PY) -m app migrate
	@# The first run creates a demo admin user and prints its password once.
	$(PY) -m app demo
	$(PY) -m app serve

test: $(STAMP)
	$(PY) -c "import app.services as s; s.ensure_redis_installed()"
	@# promtool checks deploy/alerts.yml; without it those tests skip.
	$(PY) -c "import pathlib, app.services as s; s.ensure_promtool(pathlib.Path('$(VENV)/bin'))"
	@# pytest exits 5 when it collects nothing; that is not a failure of ours.
	$(PY) -m pytest; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

lint: $(STAMP)
	$(PY) -m ruff check app actors tests
	$(PY) -m ruff format --check app actors tests
	$(PY) -m mypy app actors

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	@# Fan-out and idle of the floor, python-socketio and hearth (asyncio and uvloop) at
	@# N=1000 and 5000, hearth's durable publishes, presence of 1000 users and delivery
	@# across two instances, and every server with 1% of 1000 subscribers stalled
	@# (under 15 minutes).
	$(PY) -m bench

stop:
	@if [ -x $(PY) ]; then $(PY) -m app services stop; fi

# Three instances (ports 8081-8083, files in var/cluster/<n>/) behind HAProxy on 8080,
# configured from deploy/haproxy.cfg; README.rst "Scaling out".
cluster: services
	$(PY) -m app migrate
	$(PY) -m app demo
	$(PY) -m app services cluster

cluster-stop:
	@if [ -x $(PY) ]; then $(PY) -m app services cluster-stop && $(PY) -m app services stop; fi

clean: cluster-stop
	rm -rf var
