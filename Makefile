# gdriver — make run | make test | make lint | make bench
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
GEARMAND_PORT ?= 4730
RUN_ARGS ?=
LINT_PATHS := $(wildcard gdriver tests bench examples)

.PHONY: install system-deps bench-deps tools run stop test lint format bench deploy-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lint]'
	touch $@

# gearmand and its C client/worker (Debian: gearman-job-server, gearman-tools); the other
# servers and clients of the compatibility matrix (Perl Gearman::Server and Gearman::Client,
# PHP's gearman extension), telnet for the console tests, iproute2 for the network-namespace
# drills (util-linux's unshare and prlimit are part of every Debian)
SYSTEM_PACKAGES := gearman-job-server gearman-tools gearman-server libgearman-client-perl \
	php-cli php-gearman telnet iproute2
system-deps:
	@missing=$$(for p in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; \
	done); \
	if [ -n "$$missing" ]; then \
		$(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

# helm, promtool and systemd-analyze for the deploy checks
tools: install
	deploy/tools.sh

# gdriver with the example workers, in the foreground. GEARMAND_PORT (default 4730): the
# gearmand to use; one is started on 127.0.0.1:$(GEARMAND_PORT) if none listens there.
# RUN_ARGS: more gdriver flags, e.g. RUN_ARGS="--console_port 47301 --metrics_port 9465" on a
# shared host. The pidfiles live in .run/ of this checkout; `make stop` stops what it started.
RUN_DIR := $(CURDIR)/.run
run: install system-deps
	@mkdir -p $(RUN_DIR)
	@if ! $(PY) -c "import socket; socket.create_connection(('127.0.0.1', $(GEARMAND_PORT)), 1)" 2>/dev/null; then \
		echo "starting gearmand on 127.0.0.1:$(GEARMAND_PORT)"; \
		/usr/sbin/gearmand --listen=127.0.0.1 --port=$(GEARMAND_PORT) --daemon \
			--pid-file=$(RUN_DIR)/gearmand.pid --log-file=$(RUN_DIR)/gearmand.log; \
		sleep 0.5; \
	fi
	$(PY) -m gdriver run --configfile examples/gdriver.yml --server 127.0.0.1:$(GEARMAND_PORT) \
		--pidfile $(RUN_DIR)/gdriver.pid $(RUN_ARGS)

# stop the gdriver and the gearmand `make run` started from this checkout (by their pidfiles)
stop:
	@for name in gdriver gearmand; do \
		f=$(RUN_DIR)/$$name.pid; pid=$$(cat $$f 2>/dev/null); \
		if [ -n "$$pid" ] && kill -0 $$pid 2>/dev/null; then \
			echo "stopping $$name (PID $$pid)"; kill -TERM $$pid; \
			for i in $$(seq 100); do kill -0 $$pid 2>/dev/null || break; sleep 0.1; done; \
		fi; \
		rm -f $$f; \
	done

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

# the bench's instructions section counts a worker's instructions (valgrind) and system
# calls (strace) per job: the deterministic figures of the job path
BENCH_PACKAGES := valgrind strace
bench-deps:
	@$(MAKE) --no-print-directory system-deps SYSTEM_PACKAGES="$(BENCH_PACKAGES)"

bench: install system-deps bench-deps
	$(PY) bench/run.py

clean:
	rm -rf $(VENV) .tools .pytest_cache .mypy_cache .ruff_cache .hypothesis
