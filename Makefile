# DiffAlign.  The first two commands on a fresh machine:  make bench METHOD=alignprop  and  make test
# Every target creates the project's virtual environment (.venv) when it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

METHOD ?= alignprop
MODEL  ?=
REWARD ?=
STEPS  ?=
SEED   ?=
PRESET ?=
ARGS   ?=
METHODS ?=
SEEDS  ?= 0 1 2
SWEEP  ?= results/sweeps/paper
OUT    ?= docs/paper

.PHONY: sweep paper paper-sweep credit credit-sweep regress baselines perf gpu-check leaderboard
.PHONY: setup bench test test-matrix test-quick geneval-bench lint base-model flow-model judge geneval-judge base-quality flow-quality flow-bench tiny-rewards tiny-pairs clean-venv parity peers

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test,ray]"
	SITE=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") && \
		cp diffalign/_startup_hook.py $$SITE/diffalign_startup_hook.py && \
		echo "import diffalign_startup_hook" > $$SITE/diffalign_startup_hook.pth
	$(PY) -c "import bench, diffusers, transformers, peft, accelerate, open_clip, pandas"
	touch $(STAMP)

# PRESET=geneval: bench/presets/geneval/$(METHOD).yaml (a task's presets); PRESET=path: that file.
# PROCS=N: data parallel over N processes (torchrun; on CPU gloo, on GPUs one per process), into a named run folder.
PROCS  ?= 1
PORT   ?= 29511
RUNSTAMP := $(shell date +%Y%m%d-%H%M%S)
MULTI  := $(filter-out 1,$(PROCS))
bench: $(STAMP)
	$(if $(MULTI),$(PY) -m torch.distributed.run --nproc_per_node $(PROCS) --master_port $(PORT),$(PY)) -m bench run \
		--method $(METHOD) $(if $(MODEL),--model $(if $(wildcard models/$(MODEL)/model_index.json),models/$(MODEL),$(MODEL))) \
		$(if $(REWARD),--reward $(REWARD)) $(if $(STEPS),--steps $(STEPS)) $(if $(SEED),--seed $(SEED)) \
		$(if $(PRESET),--preset $(if $(wildcard $(PRESET)),$(PRESET),bench/presets/$(PRESET)/$(METHOD).yaml)) \
		$(if $(MULTI),--out results/runs/$(METHOD)-procs$(PROCS)-$(RUNSTAMP)) $(ARGS)

# The suite on both cores: JOBS pytest-xdist workers of one torch thread each (JOBS=0: one process, two threads).
JOBS   ?= 2
XDIST  := $(if $(filter-out 0,$(JOBS)),-n $(JOBS) --dist worksteal)
test: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not matrix" tests

# The rest of the every-method matrices (names sharing a method file with the representative make test runs): CI.
test-matrix: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m matrix tests

# The quick loop: everything but the end-to-end runs through the harness (marked slow).
test-quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# The style pyproject.toml states (tests/test_style.py runs the same check).
lint: $(STAMP)
	$(VENV)/bin/ruff check .

# A grid of method x seed (x reward) into one sweep folder; finished runs are skipped, killed ones resumed.
#   make sweep METHODS="alignprop ddpo" SEEDS="0 1 2" REWARD=saturation [SWEEP=results/sweeps/NAME] [ARGS="--set steps=10"]
#   EXECUTOR=ray [ADDRESS=host:port]: each run a Ray task (a local instance, or the cluster at ADDRESS)
EXECUTOR ?= local
ADDRESS  ?=
sweep: $(STAMP)
	$(PY) -m bench sweep --methods $(if $(METHODS),$(METHODS),$(METHOD)) --seeds $(SEEDS) $(if $(REWARD),--reward $(REWARD)) \
		--root $(SWEEP) --executor $(EXECUTOR) $(if $(ADDRESS),--address $(ADDRESS)) $(ARGS)

# The README's example sweep (bench/sweeps/paper*.yaml: every method x 3 seeds, and AlignProp K = 1 for the RLR
# study) into results/sweeps/paper; finished runs are skipped, so it also completes an interrupted sweep.
paper-sweep: $(STAMP)
	$(PY) -m bench sweep --file bench/sweeps/paper.yaml
	$(PY) -m bench sweep --file bench/sweeps/paper-dpok.yaml
	$(PY) -m bench sweep --file bench/sweeps/paper-alignprop-k1.yaml
	$(PY) -m bench sweep --file bench/sweeps/paper-preference.yaml
	$(PY) -m bench sweep --file bench/sweeps/paper-ogdm.yaml

# The DDE credit-assignment study (bench/sweeps/credit.yaml: four credit weightings x 3 seeds on the tiny pairs)
# into results/sweeps/credit, and its figures and table into docs/credit (the weight curves: docs/credit/weights.png).
credit-sweep: $(STAMP)
	$(PY) -m bench sweep --file bench/sweeps/credit.yaml

CREDIT ?= results/sweeps/credit
credit: $(STAMP)
	$(PY) -m bench.outputs.credit --out docs/credit/weights.png --json docs/credit/weights.json
	$(PY) -m bench compare $(CREDIT) --out-dir docs/credit --metric eval_reward_mean --metric win_rate --metric fidelity \
		--metric kl_to_base --x step
	$(PY) -m bench table $(CREDIT) --out docs/credit/table

# Every figure and table the README shows, from a sweep folder (default: the committed results/sweeps/paper):
#   make paper [SWEEP=results/sweeps/NAME] [OUT=docs/paper]
paper: $(STAMP)
	$(PY) -m bench compare $(SWEEP) --out-dir $(OUT) --metric eval_reward_mean --metric fidelity --metric kl_to_base --x step
	$(PY) -m bench compare $(SWEEP) --out-dir $(OUT) --metric eval_reward_mean --x reward_queries
	$(PY) -m bench compare $(SWEEP) --out-dir $(OUT) --metric eval_reward_mean --x unet_passes
	$(PY) -m bench compare $(SWEEP) --out-dir $(OUT) --metric eval_reward_mean --x wall_time
	$(PY) -m bench compare $(SWEEP) --grid $(OUT)/grid.png
	$(PY) -m bench compare $(SWEEP) --method rlr rlr-code alignprop ddpo --metric eval_reward_mean --metric fidelity \
		--x images --out $(OUT)/rlr_study.png --title "RLR study: eval reward and prompt fidelity against images generated"
	$(PY) -m bench compare $(SWEEP) --method ddpo ddpo-sf dpok --metric eval_reward_mean --metric kl_to_base \
		--x step --out $(OUT)/ddpo_vs_dpok_kl.png --title "DDPO vs DPOK: eval reward and KL to the base model"
	$(PY) -m bench table $(SWEEP) --out $(OUT)/table
	$(PY) -m bench report $(SWEEP) --out $(OUT)/report.html

# Where one optimizer step's time goes against its UNet-pass floor, per method, and how cost grows with the work
# (bench/tools/perf.py; one process per measurement): docs/perf.json, docs/perf.md, docs/perf/*.png.  About 15 minutes.
perf: $(STAMP)
	$(PY) -m bench.tools.perf --out docs

# One GPU with an SD 1.5-sized random-weight model (bench/tools/gpu_check.py): AlignProp K = 1 at batch 1/2/4, DDPO's
# sampling and training at batch 8, the UNet's achieved FLOP/s, every method on the tiny world on CUDA:
# docs/gpu_check.json and docs/gpu_check.md.  About 4 minutes on one H200; refuses with one line without a GPU
# (its CPU tiny mode, python -m bench.tools.gpu_check --tiny, runs in make test).
gpu-check: $(STAMP)
	$(PY) -m bench.tools.gpu_check --out docs

# CI regression of reward curves against results/baselines/ (what .ci/run does after the tests).
regress: $(STAMP)
	$(PY) -m bench regress $(if $(METHODS),--methods $(METHODS)) $(ARGS)

# Record the baselines anew (deliberately; commit results/baselines/*.json afterwards).
baselines: $(STAMP)
	$(PY) -m bench regress --update $(if $(METHODS),--methods $(METHODS)) $(ARGS)

# Recipes for the committed tiny-world weights (CPU: about an hour; a GPU: minutes).
base-model: $(STAMP)
	$(PY) -m bench.tinyworld.pretrain --out models/tiny-t2i --steps 3000

# The tiny flow world's base model: the same networks and data, rectified flow (velocity loss, logit-normal time).
flow-model: $(STAMP)
	$(PY) -m bench.tinyworld.pretrain --out models/tiny-flow --steps 3000 --objective flow

judge: $(STAMP)
	$(PY) -m bench.tinyworld.judge --out models/tiny-judge

# The GenEval judge of the tiny-geneval reward (another seed and architecture than the judge, plus position).
geneval-judge: $(STAMP)
	$(PY) -m bench.tinyworld.geneval_judge --out models/tiny-geneval-judge --threads 1

# The tiny world's reward models: tiny-clip first (tiny-aesthetic sits on it), then tiny-aesthetic, tiny-count.
tiny-rewards: $(STAMP)
	$(PY) -m bench.tinyworld.train_rewards tiny-clip --out models/tiny-clip
	$(PY) -m bench.tinyworld.train_rewards tiny-aesthetic --out models/tiny-aesthetic --clip models/tiny-clip
	$(PY) -m bench.tinyworld.train_rewards tiny-count --out models/tiny-count

# The tiny world's offline preference pairs: base-model samples on the train prompts ranked by the hidden rating.
tiny-pairs: $(STAMP)
	$(PY) -m bench.tinyworld.pairs --out models/tiny-pairs

# The base model's prompt fidelity as the judge reads it (the README's table).
base-quality: $(STAMP)
	$(PY) -m bench.tools.base_quality --seeds 4 --json docs/base_quality.json --grid docs/base_samples.png

# Every method's preset on the tiny flow world (results/flow-world, resumable) and its table (docs/flow_world.md).
flow-bench: $(STAMP)
	$(PY) -m bench.tools.flow_world $(if $(METHODS),--methods $(METHODS))

# The tiny flow world's base model, measured the same way (Euler ODE, CFG 3) at 10 and 20 steps.
flow-quality: $(STAMP)
	$(PY) -m bench.tools.base_quality --model models/tiny-flow --seeds 4 --json docs/flow_quality.json \
		--grid docs/flow_samples.png
	$(PY) -m bench.tools.base_quality --model models/tiny-flow --seeds 4 --num-steps 20 --json docs/flow_quality_20.json

# ImageReward parity: the original image-reward package (own venv, .parity-venv) vs rewards/imagereward.py
parity: $(STAMP)
	PY=$(PY) bash parity/imagereward.sh

# trl 0.23.1's AlignPropTrainer and DDPOTrainer beside ours (own venv, .peers-venv): s/step, peak memory, DDIM log-prob
peers: $(STAMP)
	PY=$(PY) bash parity/peers.sh

clean-venv:
	rm -rf $(VENV)

# The benchmark's own protocol (bench/protocols/tiny-v1.yaml: every method x 4 rewards x 3 seeds at a matched budget)
# into results/leaderboards/tiny-v1, resumable: rerun it after any interruption.  PROTOCOL=bench/protocols/tiny-v2.yaml
# (or tiny-flow-v2.yaml): version 2, its tuning first, then budget curves (docs/leaderboard-v2.md).  WORKERS=2 runs two drivers over the
# same folder (they share the runs through the run folders' locks); EXECUTOR=ray [ADDRESS=...] a Ray task per run.
PROTOCOL ?= bench/protocols/tiny-v1.yaml
WORKERS  ?= 1
leaderboard: $(STAMP)
	for i in $$(seq 2 $(WORKERS)); do $(PY) -m bench leaderboard --protocol $(PROTOCOL) --executor $(EXECUTOR) \
		$(if $(ADDRESS),--address $(ADDRESS)) > /dev/null & sleep 5; done; \
	$(PY) -m bench leaderboard --protocol $(PROTOCOL) --executor $(EXECUTOR) $(if $(ADDRESS),--address $(ADDRESS)); \
	wait; $(PY) -m bench leaderboard --protocol $(PROTOCOL) --tables-only

# Issue 29's methods on tiny-geneval (their bench/presets/geneval/ presets, the tiny flow world), resumable, into
# results/geneval/; writes docs/geneval.md and the README's proxy-against-gold table.  METHODS= to pick, SEEDS=.
geneval-bench: $(STAMP)
	$(PY) -m bench.tools.geneval_bench $(if $(METHODS),--methods $(METHODS)) --seeds $(SEEDS)
