# flowrl: `make demo` runs the main job on the embedded toy model, `make test` runs the test suite.
# Both create .venv and install the pinned environment (constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flowrl-installed
PYTEST_ARGS ?=

.PHONY: setup demo test test-fast toy-pretrain toy-pretrain-cpu toy-baseline clean design-space design-space-quick
DS_ARGS ?=

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# A short run of the main pipeline (about 7 minutes on 2 cores): toy GenEval before and after RL
# (measured 0.601 -> 0.707, 0.780 at epochs 9 and 19; 7 min 5 s on an AMD EPYC imitating an AVX2-only
# CPU, float32 and compiled, as `auto` chose). A constant lr: the cosine decay is tuned for the full 80 epochs.
demo: setup
	rm -rf outputs/demo
	$(BIN)/flowrl train pipelines/toy-geneval.yaml train.epochs=20 eval.every=10 checkpoint.every=10 optimizer.schedule=constant --out outputs/demo
	@echo "outputs/demo: curves.png (reward vs epochs and minutes), samples/epoch-N.png, metrics.jsonl, checkpoints/"

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The suite without the longest integration runs (marked slow, 5-40 s each; CI runs them through `make test`).
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Rebuild the embedded model: from scratch on the CPU (about 38 minutes on 2 cores), then its
# transformer continued on a GPU (about 6 minutes on an H200; docs/toy-model.md). Without a GPU,
# `make toy-pretrain-cpu` builds only the first stage (toy GenEval about 0.35 instead of 0.60).
toy-pretrain: toy-pretrain-cpu
	$(BIN)/flowrl toy pretrain --init outputs/toy-sd3-cpu --out outputs/toy-sd3 --device cuda --workers 14 --scenes 300000 --batch 1024 --steps 8647

toy-pretrain-cpu: setup
	$(BIN)/flowrl toy pretrain --out outputs/toy-sd3-cpu

# The base scores recorded in README (no CFG and CFG 4.5, 20-step Euler, 4 images per test prompt).
toy-baseline: setup
	$(BIN)/flowrl toy sample --cfg 1 --cfg 4.5 --out outputs/toy-baseline

# The paper's design-space study on the toy model (<= 3 h on 2 cores): outputs/design-space/, docs/results.md.
design-space: setup
	$(BIN)/python benchmarks/design_space.py $(DS_ARGS)

# Its quick version (<= 30 min, 5 combinations x 1 seed): outputs/design-space-quick/, docs/results-quick.md.
design-space-quick: setup
	$(BIN)/python benchmarks/design_space.py --quick $(DS_ARGS)

clean:
	rm -rf outputs .pytest_cache
