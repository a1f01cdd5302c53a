# captcha_lit: `make train`, `make test`, `make bench` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: setup browser slurm train test test-fast bench serve tensorboard clean help

help:
	@echo "make train      set up .venv, generate or reuse the dataset, train the default model, print test metrics"
	@echo "make test       set up .venv and run the test suite (installs SLURM for its tests when root on Debian)"
	@echo "make test-fast  the suite without the tests marked slow (a couple of minutes at most)"
	@echo "make bench      run the accuracy and speed benchmarks (writes outputs/bench/)"
	@echo "make serve      serve the newest trained checkpoint over HTTP (MODEL=path.ckpt|.onnx to choose one)"
	@echo "make tensorboard  serve TensorBoard on outputs/"
	@echo "pass extra Hydra overrides with ARGS='model=cnn trainer.max_epochs=3'"

setup: $(STAMP) browser

# The browser tests drive Debian's chromium and chromium-driver through Selenium: installed here
# when missing (as root), never downloaded at run time. Without them those tests are skipped.
browser:
	@if command -v chromedriver >/dev/null && { command -v chromium || command -v chromium-browser; } >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver fonts-liberation; \
	else echo "the browser tests need chromium and chromedriver (as root: apt-get install chromium chromium-driver)"; fi

# torch and torchvision are pinned to builds that exist for this platform; the
# pyproject ranges admit them and newer compatible releases.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -e ".[deploy,viz,dev,scale]"
	touch $(STAMP)

# The SLURM tests start a one-node cluster from Debian's slurm-wlm and munge. Installed where
# this can be done (root, apt-get); elsewhere those tests skip and say why.
SLURM_PACKAGES := slurm-wlm munge
slurm:
	@PATH="$$PATH:/usr/sbin:/sbin"; missing=""; \
	for program in slurmctld slurmd munged sbatch; do command -v $$program >/dev/null || missing="$$missing $$program"; done; \
	if [ -z "$$missing" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing $(SLURM_PACKAGES) for the SLURM tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$(SLURM_PACKAGES); } >/dev/null || echo "could not install $(SLURM_PACKAGES): the SLURM tests will skip"; \
	else echo "$(SLURM_PACKAGES) not installed (it takes root and apt-get): the SLURM tests will skip"; fi

train: $(STAMP)
	$(PY) -m captcha_lit.train $(ARGS)

test: $(STAMP) browser slurm
	$(PY) -m pytest -q $(ARGS)

test-fast: $(STAMP) browser
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) -m captcha_lit.bench $(ARGS)

# The newest training run's best checkpoint (its last.ckpt if it has no best yet).
MODEL ?= $(shell run=$$(ls -td outputs/train/runs/*/checkpoints 2>/dev/null | head -n 1); \
	[ -n "$$run" ] && { ls -t $$run/epoch*.ckpt 2>/dev/null | head -n 1 | grep . || ls $$run/last.ckpt 2>/dev/null; })

serve: $(STAMP)
	@if [ -z "$(MODEL)" ]; then \
		echo "no trained checkpoint in outputs/train/runs/*/checkpoints/; run \`make train\` first (or pass MODEL=path)"; \
		exit 1; \
	fi
	$(PY) -m captcha_lit.serve model_path=$(MODEL) $(ARGS)

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir outputs

clean:
	rm -rf outputs/train outputs/eval outputs/multirun .pytest_cache
