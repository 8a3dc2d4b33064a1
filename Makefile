# The two commands: `make demo` (the main job) and `make test`.
# Every install goes through constraints.txt, which pins torch to the CPU wheel on disk.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Real CIFAR-10 on these machines; elsewhere cifarlab downloads the official release.
SHARED_DATA := $(wildcard ../shared/datasets/cifar10-jpeg.tar.gz)
CIFARLAB_DATA ?= $(if $(SHARED_DATA),$(abspath $(SHARED_DATA)),)
export CIFARLAB_DATA

DEMO_EPOCHS ?= 4
# := expands once, so every step of the demo names the same run folder
DEMO_RUN    := $(or $(DEMO_RUN),demo-$(shell date +%Y%m%d-%H%M%S))

.PHONY: install test lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/cifarlab data info
	$(BIN)/cifarlab train --epochs $(DEMO_EPOCHS) --name $(DEMO_RUN)
	$(BIN)/cifarlab evaluate runs/$(DEMO_RUN)
	@echo "run folder: runs/$(DEMO_RUN)"

bench: $(STAMP)
	$(BIN)/python bench/train.py throughput
	$(BIN)/python bench/train.py tta

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
