# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test soak proto setup clean prometheus jemalloc bytecode

$(STAMP): pyproject.toml $(wildcard worker/*.c)  # the C sources pip builds (pyproject ext-modules)
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found (set PYTHON=...)"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## the demo fleet: local etcd, 3 workers, a router on 127.0.0.1:50051, 50 demo tenants
run: $(STAMP) jemalloc
	$(BIN)/modelfleet up

## the whole suite (soaks excluded)
test: $(STAMP) bytecode
	$(BIN)/python -m pytest -q

## the project's own bytecode, written once: with PYTHONDONTWRITEBYTECODE set (as on CI) every
## process the suite starts (~200 routers, workers, CLIs) would otherwise compile it again (~0.2 s)
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q modelfleet router worker sharding version_service loadtest tests >/dev/null

## long fault and load soaks
soak: $(STAMP) bytecode
	$(BIN)/python -m pytest -q -m soak

## a Debian package, best effort and quiet: install, else refresh the index and install
apt_install = { apt-get install -y -qq --no-install-recommends $(1) >/dev/null 2>&1 || \
  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $(1) >/dev/null 2>&1; }; }

## a real Prometheus server for the scrape test (Debian's package; needs root and apt)
prometheus:
	@command -v prometheus >/dev/null 2>&1 || $(call apt_install,prometheus)
	@prometheus --version 2>&1 | head -n 1

## jemalloc, which routers and workers run on where the system has it (modelfleet/allocator.py):
## Debian's libjemalloc2; needs root and apt, best effort (without it they use glibc's malloc)
jemalloc:
	@ldconfig -p 2>/dev/null | grep -q libjemalloc || $(call apt_install,libjemalloc2)
	@ldconfig -p 2>/dev/null | grep -q libjemalloc && echo "jemalloc: found" || echo "jemalloc: not found (glibc malloc)"

## regenerate the gRPC stubs from proto/ (a test fails when they drift)
proto: $(STAMP)
	$(BIN)/python -m modelfleet.protogen

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
