# AOS: `make run` starts everything on this machine; `make test` is what CI runs.
# Every target installs into .venv first, so a fresh clone needs only Python 3.11+ and pip.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Reinstall only when the dependencies change, not on every make.
INSTALLED := $(VENV)/.aos-installed

PACKAGES := contracts/aos_contracts \
	services/plumbing/aos_plumbing \
	services/planner/aos_planner \
	services/executor/aos_executor \
	services/ledger/aos_ledger \
	services/tracer/aos_tracer \
	cli/aos_cli
MYPY_PATHS := $(PACKAGES) bench tests

.PHONY: venv infra-tools test test-unit lint format run bench soak schemas clean

venv: $(INSTALLED)

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
		|| { echo "AOS needs Python 3.11 or newer (PYTHON=$(PYTHON))"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[embedded,dev]'
	touch $@

# promtool, prometheus and alertmanager for tests/infra (Debian packages), when absent.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo -n)
infra-tools:
	@command -v promtool >/dev/null && command -v prometheus-alertmanager >/dev/null \
		|| { $(SUDO) apt-get update -qq \
		&& $(SUDO) apt-get install -y -qq prometheus prometheus-alertmanager >/dev/null; } \
		|| echo "infra-tools: could not install them; tests/infra will skip what needs them"

# Servers: private ones on free ports, unless AOS_NATS_URL, AOS_POSTGRES_URL and
# REDIS_URL all point at running ones (see tests/conftest.py).
test: venv infra-tools
	$(BIN)/python -m aos_contracts.generate --check
	$(MAKE) --no-print-directory lint
	@# pytest exits 5 when it collects no tests: not a failure for this build.
	$(BIN)/python -m pytest; rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; exit 0; fi; exit $$rc

# The tests that need no server (pure logic, contracts, in-memory stores): seconds.
test-unit: venv
	$(BIN)/python -m pytest -m "not integration" -q

lint: venv
	$(BIN)/ruff check .
	$(BIN)/mypy $(MYPY_PATHS)

format: venv
	$(BIN)/ruff format .

run: venv
	$(BIN)/aos up

bench: venv
	$(BIN)/python bench/bench.py $(BENCH_ARGS)

# N goals under random SIGKILL+restart of the services; exits non-zero when a run never
# ends, a side effect happens twice or the ledger and the tracer disagree. Not in `test`.
soak: venv
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

schemas: venv
	$(BIN)/python -m aos_contracts.generate

clean:
	rm -rf .aos .pytest_cache .mypy_cache .ruff_cache
