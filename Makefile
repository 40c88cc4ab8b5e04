# DiffAlign.  The first two commands on a fresh machine:  make bench METHOD=alignprop  and  make test
# Every target creates the project's virtual environment (.venv) when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

METHOD ?= alignprop
REWARD ?=
STEPS  ?=
SEED   ?=
ARGS   ?=

.PHONY: setup bench test base-model judge base-quality clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	$(PY) -c "import bench, diffusers, transformers, peft, accelerate, open_clip, pandas"
	touch $(STAMP)

bench: $(STAMP)
	$(PY) -m bench run --method $(METHOD) $(if $(REWARD),--reward $(REWARD)) $(if $(STEPS),--steps $(STEPS)) \
		$(if $(SEED),--seed $(SEED)) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests

# Recipes for the committed tiny-world weights (CPU: about an hour; a GPU: minutes).
base-model: $(STAMP)
	$(PY) -m bench.pretrain --out models/tiny-t2i --steps 3000

judge: $(STAMP)
	$(PY) -m bench.judge --out models/tiny-judge

# The base model's prompt fidelity as the judge reads it (the README's table).
base-quality: $(STAMP)
	$(PY) -m bench.quality --seeds 4 --json docs/base_quality.json --grid docs/base_samples.png

clean-venv:
	rm -rf $(VENV)
