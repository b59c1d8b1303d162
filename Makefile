# Every target that runs code depends on `install`, which builds .venv once and again only
# when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NPROC ?= 2
ARGS ?=

.PHONY: install train test lint format bench clean

install: $(STAMP)

# tests/test_multihost.py needs `ip netns` (CI: a fresh Debian machine, as root); it skips without.
$(STAMP): pyproject.toml
	@if ! command -v ip >/dev/null && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq iproute2; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: install
	$(BIN)/torchrun --standalone --nproc_per_node=$(NPROC) -m qatdist.train $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: install lint
	$(BIN)/pytest -q -rs

bench: install
	$(BIN)/python scripts/bench.py $(ARGS)

clean:
	rm -rf runs data .pytest_cache
