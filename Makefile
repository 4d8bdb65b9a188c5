# The two commands the README promises: `make demo` (the main job) and `make test`.
# Each creates .venv in the repo root when missing and installs the requirements into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast lint demo clean tensorboard notebook

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit("Python 3.10+ is required, found " + sys.version.split()[0]) if sys.version_info < (3, 10) else None'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

# The whole suite, slow tests included (this is what CI runs), after the linter.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf .pytest_cache .ruff_cache

# The README's first command: train a small ViT from scratch on the 8x8 digits bundled with
# scikit-learn (offline, CPU, ~1-2 minutes of training on 2 cores; reaches >= 0.95 accuracy).
# One intra-op thread: this model's ops are too small to gain from more, and extra threads
# collapse when the CPU is shared (measured 20x slower per step on a busy 2-core machine).
# Run again, it continues the demo's run (a finished one just prints its summary) instead of
# overwriting it; delete output/digits-demo_* and logs/digits-demo to train it afresh.
DEMO_RESUME = $(if $(wildcard output/digits-demo_last.pt),--resume)
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) train.py --name digits-demo --dataset digits --model_type demo \
		--pretrained_dir none --img_size 32 --train_batch_size 128 --learning_rate 0.1 \
		--num_steps 800 --warmup_steps 50 --eval_every 200 --num_workers 1 $(DEMO_RESUME)

# TensorBoard on the runs' logs (LOGDIR=logs/NAME: one run), with the environment's Python, as
# every command the scripts print is (`tensorboard` alone is on the PATH only in an activated
# environment). Each run's every scalar is also in <log_dir>/metrics.jsonl.
LOGDIR ?= logs
PORT ?= 6006
tensorboard: $(STAMP)
	$(PY) -m tensorboard.main --logdir $(LOGDIR) --port $(PORT)

# The attention-map notebook. Jupyter's notebook server is not among the requirements.
notebook: $(STAMP)
	@$(PY) -c 'import importlib.util, sys; importlib.util.find_spec("notebook") or sys.exit("make notebook: Jupyter Notebook is not installed in $(VENV); install it with $(PY) -m pip install notebook, then run make notebook again.")'
	$(PY) -m notebook visualize_attention_map.ipynb
