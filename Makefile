# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup system-deps demo test lint clean

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first: the pinned CPU wheel; an unpinned `torch` would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[export,dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/heimdall demo

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy src

# Debian packages the tests need (Chromium, iproute2), installed with apt-get when missing and
# run as root; otherwise one line naming the command. `make demo` needs none of them.
system-deps:
	bash scripts/system_deps.sh

# Two workers, a test file each: many tests wait on servers and subprocesses, so two keep both
# cores busy; each worker starts its own servers (free ports, its own database).
test: system-deps lint
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile

clean:
	rm -rf .heimdall test-artifacts
