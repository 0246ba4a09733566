# cvarch: the two set-up commands are `make train` and `make test`; both install what they need first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: install train test test-fast bench lint format clean

# pip byte-compiles what it installs (not --no-compile: where PYTHONDONTWRITEBYTECODE=1, as on the development
# VM, nothing would ever write a .pyc and every interpreter the tests start would recompile torch from source);
# the venv's own pip (23.2+) installs editable pyproject projects, so it is not upgraded first
install: $(STAMP)  ## venv + editable install with the dev extra (redone only when pyproject.toml changes)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

train: install  ## train the default model on the embedded digits dataset; ARGS="model=... optimizer.lr=..." are Hydra overrides
	$(BIN)/cvarch-train $(ARGS)

PYTEST := $(BIN)/python -m pytest -n auto --dist loadgroup  # one worker per core (pytest-xdist)

test: install  ## the whole test suite (slow tests included), one worker per core
	$(PYTEST) $(ARGS)

test-fast: install  ## the suite without the slow marker: no training longer than a few steps
	$(PYTEST) -m "not slow" $(ARGS)

bench: install  ## cvarch-bench, a developer tool: loader, step overhead, epoch and start-up ratios on $$CVARCH_DATA_DIR/cifar10 (~17 min on 2 cores); writes bench.json; ARGS="only=[step] repeats=3" are its keys (conf/bench.yaml)
	$(BIN)/cvarch-bench $(ARGS)

lint: install
	$(BIN)/ruff check cvarch tests scripts
	$(BIN)/ruff format --check cvarch tests scripts

format: install
	$(BIN)/ruff check --fix cvarch tests scripts
	$(BIN)/ruff format cvarch tests scripts

clean:
	rm -rf $(VENV) logs multirun outputs .cache .pytest_cache .ruff_cache *.egg-info
