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

COMMA := ,
# Under CI=true the suite fails, rather than skips, a test whose needs are missing
# (tests/conftest.py `require`), so CI installs them all: the `peers` extra (OpenVINO, NNCF,
# ONNX Runtime: about 40 s from the registry), and as root on Debian `ip netns` (iproute2, for
# tests/test_multihost.py) and a C++ compiler (qatdist's fake-quant ops).
EXTRAS := $(if $(filter true 1,$(CI)),dev$(COMMA)peers,dev)
APT_NEEDS := $(if $(shell command -v ip),,iproute2) $(if $(shell command -v c++),,g++)

$(STAMP): pyproject.toml
	@if [ -n "$(strip $(APT_NEEDS))" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq $(APT_NEEDS); fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
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
