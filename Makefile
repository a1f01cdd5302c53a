# captcha_lit: `make train`, `make test`, `make bench` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup train test test-fast bench tensorboard clean help

help:
	@echo "make train      set up .venv, generate or reuse the dataset, train the default model, print test metrics"
	@echo "make test       set up .venv and run the test suite"
	@echo "make bench      run the accuracy and speed benchmarks (writes outputs/bench/)"
	@echo "make tensorboard  serve TensorBoard on outputs/"
	@echo "pass extra Hydra overrides with ARGS='model=cnn trainer.max_epochs=3'"

setup: $(STAMP)

# torch and torchvision are pinned to builds that exist for this platform; the
# pyproject ranges admit them and newer compatible releases.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[deploy,viz,dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m captcha_lit.train $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) -m captcha_lit.bench $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir outputs

clean:
	rm -rf outputs/train outputs/eval outputs/multirun .pytest_cache
