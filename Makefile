# The two commands: `make demo` (the main job) and `make test`.
# Every install goes through constraints.txt, which pins torch to the CPU wheel on disk.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

# Real CIFAR-10 on these machines (the original pixels, else the JPEG copy); elsewhere cifarlab
# downloads the official release.
SHARED_DATA := $(firstword $(wildcard ../shared/datasets/cifar-10-lossless-python.tar.gz) \
                           $(wildcard ../shared/datasets/cifar10-jpeg.tar.gz))
CIFARLAB_DATA ?= $(if $(SHARED_DATA),$(abspath $(SHARED_DATA)),)
export CIFARLAB_DATA

DEMO_TRIALS ?= 10
# the budget the demo's answer is for: epochs of airnet on all training images
DEMO_EPOCHS ?= 2
# := expands once, so every step of the demo names the same study and run folders
DEMO_NAME   := $(or $(DEMO_NAME),demo-$(shell date +%Y%m%d-%H%M%S))

.PHONY: install test test-fast test-slow lint demo bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy

# Two layers: the fast one (unit and in-process tests, under a minute on 2 cores) runs first and
# stops at the first failure; the slow one (servers, browser, subprocesses, studies, the
# seeded-bug suite) runs after it. `make test` runs both.
test: lint test-fast test-slow

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -x

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

# The whole pipeline, sized for a 2-core CPU: a study that answers for DEMO_EPOCHS epochs (the
# recipe first, cheap trials, the best of them at the target budget), its plots, then the answer
# and the recipe retrained on train + validation at that budget and compared on test.
demo: $(STAMP)
	$(BIN)/cifarlab data info
	$(BIN)/cifarlab tune --name $(DEMO_NAME) --space examples/demo-space.yaml --trials $(DEMO_TRIALS) --target-epochs $(DEMO_EPOCHS)
	$(BIN)/cifarlab tune report studies/$(DEMO_NAME)
	$(BIN)/cifarlab train --from-study studies/$(DEMO_NAME) --name $(DEMO_NAME)
	$(BIN)/cifarlab train --from-study studies/$(DEMO_NAME) --baseline --name $(DEMO_NAME)-baseline
	$(BIN)/cifarlab compare runs/$(DEMO_NAME)-baseline runs/$(DEMO_NAME)
	@echo "study folder: studies/$(DEMO_NAME)   report: studies/$(DEMO_NAME)/report/index.html"
	@echo "run folder:   runs/$(DEMO_NAME)"
	@echo "serve it:     $(BIN)/cifarlab serve runs/$(DEMO_NAME)   (then open http://127.0.0.1:8000/)"

bench: $(STAMP)
	$(BIN)/python bench/train.py throughput
	$(BIN)/python bench/train.py tta

clean:
	rm -rf $(VENV) runs studies bench-out .pytest_cache .mypy_cache .ruff_cache
