# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.runtime
STAMP := $(VENV)/.installed

.PHONY: run test check bench soak clean browser postgres vm-test vm-tools

# What serving needs, and nothing more.
$(RUNTIME): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --quiet --upgrade pip
	$(BIN)/pip install --quiet --quiet -e .
	touch $(RUNTIME)

# The test and check tools on top.
$(STAMP): $(RUNTIME)
	$(BIN)/pip install --quiet --quiet -e '.[dev]'
	touch $(STAMP)

# One real analysis through the sandbox, then the server with the bundled plugins.
run: $(RUNTIME)
	$(BIN)/plughost run image_info --image plugins/samples/sunset.png
	$(BIN)/plughost serve --db .plughost/jobs.sqlite3 $(if $(PORT),--port $(PORT))

# The browser the console's tests drive: Debian's chromium (Playwright's own
# download is not used). Installed once; a machine that has it skips the step.
# curl runs the README's HTTP examples as printed (tests/test_readme.py).
browser:
	command -v chromium >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium)
	command -v curl >/dev/null || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q curl)

test: $(STAMP) browser postgres
	$(BIN)/python -m pytest

# The multi-node tests start a private PostgreSQL server and put worker nodes
# in network namespaces: Debian's postgresql and iproute2, installed once (as root;
# without them those tests skip).
PG_BIN := /usr/lib/postgresql/15/bin
postgres:
	@if [ "$$(id -u)" = 0 ] && ! { [ -x $(PG_BIN)/initdb ] && command -v ip >/dev/null; }; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql iproute2; \
	fi

# What operators run: a real Debian 12 with systemd as init and cgroup v2, in
# QEMU, with the wheel of this tree; the checks of tests/vm/inside.sh run
# inside, once per kernel (Debian 12's and Debian 13's). As root. The base
# system and kernel packages are cached in PLUGHOST_VM_DIR (/var/tmp/plughost-vm).
vm-test: vm-tools
	PYTHON=$(PYTHON) bash tests/vm/vm-test.sh

vm-tools:
	@if ! { command -v qemu-system-x86_64 && command -v debootstrap && command -v debugfs; } >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-system-x86 debootstrap e2fsprogs; \
	fi

# The same checks run in pre-commit and CI: lint, format, types, governance.
check: $(STAMP)
	$(BIN)/ruff check host sandbox plughost tests scripts plugins examples
	$(BIN)/ruff format --check host sandbox plughost tests scripts plugins examples
	$(BIN)/mypy
	$(BIN)/python scripts/scan_governance.py

# Benchmarks against the peers; writes docs/performance.md and docs/latency.png.
bench: $(STAMP)
	$(BIN)/pip install --quiet --quiet -e '.[dev,bench]'
	$(BIN)/python scripts/bench.py --write-docs

# A real server under mixed benign, hostile, oversized and slow clients (not part of CI).
SOAK_MINUTES ?= 30
soak: $(STAMP)
	$(BIN)/python scripts/soak.py --minutes $(SOAK_MINUTES) --json .plughost/soak.json

clean:
	rm -rf $(VENV) build *.egg-info
