# gdriver — make run | make test | make lint | make bench
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
GEARMAND_PORT ?= 4730
RUN_ARGS ?=
LINT_PATHS := $(wildcard gdriver tests bench examples)

.PHONY: install system-deps tools run test lint format bench deploy-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $@

# gearmand and its C client/worker (Debian: gearman-job-server, gearman-tools)
system-deps:
	@if ! command -v gearmand >/dev/null 2>&1 && [ ! -x /usr/sbin/gearmand ] || ! command -v gearman >/dev/null 2>&1; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q gearman-job-server gearman-tools; \
	fi

# helm, promtool and systemd-analyze for the deploy checks
tools: install
	deploy/tools.sh

# gdriver with the example workers; starts a local gearmand if nothing listens on 127.0.0.1:4730
run: install system-deps
	@if ! $(PY) -c "import socket; socket.create_connection(('127.0.0.1', $(GEARMAND_PORT)), 1)" 2>/dev/null; then \
		echo "starting gearmand on 127.0.0.1:$(GEARMAND_PORT)"; \
		PATH="$$PATH:/usr/sbin" gearmand --listen=127.0.0.1 --port=$(GEARMAND_PORT) --daemon \
			--pid-file=/tmp/gdriver-gearmand.pid --log-file=/tmp/gdriver-gearmand.log; \
		sleep 0.5; \
	fi
	$(PY) -m gdriver run --configfile examples/gdriver.yml $(RUN_ARGS)

test: install system-deps tools
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)
	$(VENV)/bin/mypy gdriver

format: install
	$(VENV)/bin/ruff check --fix $(LINT_PATHS)
	$(VENV)/bin/ruff format $(LINT_PATHS)

deploy-check: tools
	deploy/check.sh

bench: install system-deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache .hypothesis
