"""Data parallel on CPU (gloo, 2 processes through torchrun, which is what `accelerate launch` starts too): every
method that splits its batches over processes ends a 2-process run with one run folder and the metrics of the
1-process run with the same global batch; a checkpoint under 2 processes does not hang; one process killed makes the
other exit with one line and the folder resumes on 2 processes; resuming on another count is refused with one line.

Tolerance: the 2-process run computes each UNet call on half the batch and averages the two halves' gradients in one
all-reduce, the 1-process run takes one mean over the whole batch: the same sums in another floating-point order, so
rewards and evaluation agree to about 1e-6 relative after a few updates, and a DPO margin, which beta = 500
multiplies, to about 2e-4 (measured); the test allows rtol 1e-3 (atol 1e-5).  The cost counters (images, reward
queries, UNet passes) are integers and agree exactly."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, VOLATILE, every_method, metrics_of

from bench.core import run
from methods import METHODS

pytestmark = pytest.mark.slow
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port"]
DDPO = ["ddpo.samples_per_step=4", "ddpo.sample_batch_size=4", "ddpo.train_batch_size=2", "ddpo.lr=0.01",
        "ddpo.stat_min_count=2", "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0", "ddpo.timestep_fraction=1.0"]
# GRPO: one group of 4 a round, so each of 2 processes samples half a group: the group statistics need the gathered
# rewards
GRPO = ["reward=saturation", "sampler.eta=1.0", "grpo.group_size=4", "grpo.prompts_per_step=1",
        "grpo.sample_batch_size=4", "grpo.train_batch_size=4", "grpo.grad_accum=1", "grpo.lr=0.01"]
EXACT = ["step", "images", "reward_queries", "unet_fwd", "unet_bwd", "skipped_updates"]


def _dp_methods():
    return sorted(METHODS)  # every method splits over processes (its data_parallel refuses only some configs)


def _args(pipe_dir, tmp_path, method):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    common = [f"model={pipe_dir}", f"eval_prompts={prompts}", "steps=4", "checkpoint_every=2", "eval.every=2",
              "eval.grid_every=2", "eval.num_seeds=2", "eval.num_steps=2", "sampler.num_steps=2", "threads=1",
              "eval.kl_seeds=1"]
    own = {
        "alignprop": ["reward=saturation", "alignprop.batch_size=4", "alignprop.lr=0.05"],
        "diffusion-dpo": ["reward=tiny-rating", f"diffusion_dpo.pairs={_pairs(tmp_path)}", "diffusion_dpo.batch_size=4",
                          "diffusion_dpo.lr=0.01", "diffusion_dpo.beta=500.0"],
        "dde": ["reward=tiny-rating", f"dde.pairs={_pairs(tmp_path)}", "dde.batch_size=4", "dde.lr=0.01",
                "dde.beta=500.0"],
        "ddpo": ["reward=saturation", "sampler.eta=1.0", *DDPO, "ddpo.grad_accum=1"],
        "ddpo-sf": ["reward=saturation", "sampler.eta=1.0", *DDPO, "ddpo.grad_accum=2"],
        "dpok": ["reward=saturation", "sampler.eta=1.0", "dpok.g_batch=4", "dpok.p_step=2", "dpok.p_batch=4",
                 "dpok.grad_accum=1", "dpok.baseline=value", "dpok.lr=0.01", "dpok.skip_first_steps=0",
                 "dpok.skip_last_steps=0"],
        "rlr-code": ["reward=saturation", "sampler.eta=1.0", "rlr_code.batch_size=4", "rlr_code.chain_len=2",
                     "rlr_code.lr=0.01"],
        "rlr": ["reward=saturation", "sampler.eta=1.0", "sampler.num_steps=4", "rlr.batch_size=4", "rlr.h=1",
                "rlr.zo_samples=1", "rlr.lr=0.01"],
        "ogdm": ["reward=saturation", "eval.metrics=[tiny-clip]", "ogdm.batch_size=8", "ogdm.gamma=0.5"],
        "rwr": ["reward=saturation", "rwr.samples_per_step=4", "rwr.prompts_per_step=2", "rwr.top_fraction=0.5",
                "rwr.lr=0.01"],
        "flow-grpo": GRPO + ["sampler.num_steps=3"],
        "flow-grpo-fast": GRPO,
        "dance-grpo": GRPO + ["sampler.num_steps=3"],
        "mix-grpo": GRPO + ["sampler.num_steps=4", "grpo.sde_window=2", "grpo.window_every=1"],
        # one group of 4 a round: each process samples half a group, r needs the gathered rewards
        "diffusion-nft": ["reward=saturation", "nft.group_size=4", "nft.prompts_per_step=1", "nft.lr=0.01"],
    }
    return common + own[method]


def _pairs(tmp_path) -> str:
    import torch

    from diffalign.preference import Pairs, save_pairs

    path = tmp_path / "pairs.parquet"
    if not path.exists():
        g = torch.Generator().manual_seed(0)
        save_pairs(Pairs(["a red circle", "two blue squares", "a green triangle"] * 2,
                         torch.rand(6, 3, 8, 8, generator=g), torch.rand(6, 3, 8, 8, generator=g), {}), str(path))
    return str(path)


def _bench(argv, procs=1, port=29500, env=None, timeout=240):
    cmd = (TORCHRUN + [str(port)] if procs > 1 else [sys.executable]) + ["-m", "bench", *argv]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _sets(args):
    return [a for s in args for a in ("--set", s)]


def _port(i: int) -> int:
    """A rendezvous port of this test process: apart per xdist worker (gw0, gw1, ...) and per process id."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    return 29600 + worker * 1000 + (os.getpid() % 100) * 10 + i


@pytest.mark.parametrize("method", every_method(_dp_methods()))
def test_two_processes_give_the_one_process_run(method, small_pixel_pipeline_dir, tmp_path):
    args = _args(small_pixel_pipeline_dir, tmp_path, method)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    r1 = _bench(["run", "--method", method, "--out", one, *_sets(args)])
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _bench(["run", "--method", method, "--out", two, *_sets(args)], procs=2, port=_port(0))  # 240 s: no hang
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert r2.stdout.count("results in") == 1  # one summary line, from the main process
    a, b = metrics_of(one).drop(columns=VOLATILE), metrics_of(two).drop(columns=VOLATILE)
    assert list(a.columns) == list(b.columns) and len(a) == len(b) == 5
    pd.testing.assert_frame_equal(a[EXACT], b[EXACT])
    # ratio_dev_first is a rounding diagnostic (max |rho - 1| before any update, a maximum over the processes): a
    # process's half batch rounds its UNet calls differently at the level it measures, so it is not compared
    num = [c for c in a.columns if c not in EXACT + ["ratio_dev_first"] and pd.api.types.is_numeric_dtype(a[c])]
    np.testing.assert_allclose(b[num].to_numpy(float), a[num].to_numpy(float), rtol=1e-3, atol=1e-5, equal_nan=True)
    manifest = json.load(open(os.path.join(two, "manifest.json")))
    assert manifest["status"] == "complete" and manifest["processes"] == 2
    assert sorted(os.listdir(one)) == sorted(os.listdir(two))  # one run folder, the same files


def test_accelerate_launch_runs_the_same_two_processes(small_pixel_pipeline_dir, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2 -m bench run ...` (on CPU: torchrun's processes under
    accelerate's launcher, gloo) gives the 1-process run.  Its CLI imports torchvision before any project code, so it
    needs the environment's startup hook (diffalign/_startup_hook.py, which make setup installs)."""
    import importlib.util

    if importlib.util.find_spec("diffalign_startup_hook") is None:
        pytest.skip("the environment's startup hook is not installed (make setup installs it)")
    args = _args(small_pixel_pipeline_dir, tmp_path, "alignprop")
    one, two = str(tmp_path / "one"), str(tmp_path / "acc")
    assert _bench(["run", "--method", "alignprop", "--out", one, *_sets(args)]).returncode == 0
    launcher = os.path.join(os.path.dirname(sys.executable), "accelerate")
    r = subprocess.run([launcher, "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port",
                        str(_port(3)), "-m", "bench", "run", "--method", "alignprop", "--out", two, *_sets(args)],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(two, "manifest.json")))["processes"] == 2
    a, b = metrics_of(one).drop(columns=VOLATILE), metrics_of(two).drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(a[EXACT], b[EXACT])
    # ratio_dev_first is a rounding diagnostic (max |rho - 1| before any update, a maximum over the processes): a
    # process's half batch rounds its UNet calls differently at the level it measures, so it is not compared
    num = [c for c in a.columns if c not in EXACT + ["ratio_dev_first"] and pd.api.types.is_numeric_dtype(a[c])]
    np.testing.assert_allclose(b[num].to_numpy(float), a[num].to_numpy(float), rtol=1e-3, atol=1e-5, equal_nan=True)


def test_killed_process_stops_the_other_and_the_run_resumes_on_two(small_pixel_pipeline_dir, tmp_path):
    args = _args(small_pixel_pipeline_dir, tmp_path, "alignprop")
    folder = str(tmp_path / "killed")
    r = _bench(["run", "--method", "alignprop", "--out", folder, *_sets(args)], procs=2, port=_port(1),
               env={run.CRASH_ENV: "3", run.CRASH_RANK_ENV: "1"}, timeout=120)
    ended = time.time()
    assert r.returncode != 0
    # process 1 dies in step 3, right after the step-2 checkpoint's last write: the other has exited within 60 s
    assert ended - os.stat(os.path.join(folder, "metrics.parquet")).st_mtime < 60
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(("error:", "interrupted:"))]
    assert len(lines) == 1 and "process 0 of 2" in lines[0] or "interrupted" in lines[0], r.stderr[-3000:]
    assert metrics_of(folder)["step"].max() == 2  # the checkpoint of step 2 is what is left
    # another process count is refused with one line; the same count resumes
    one = _bench(["run", "--resume", folder])
    errors = [ln for ln in one.stderr.splitlines() if ln.startswith("error:")]
    assert one.returncode == 2 and len(errors) == 1 and "ran on 2 process(es) and is resumed on 1" in errors[0]
    again = _bench(["run", "--resume", folder], procs=2, port=_port(2))
    assert again.returncode == 0, again.stderr[-3000:]
    assert metrics_of(folder)["step"].tolist() == [0, 1, 2, 3, 4]
    assert json.load(open(os.path.join(folder, "manifest.json")))["status"] == "complete"


def test_settings_that_cannot_split_are_refused_with_one_line(small_pixel_pipeline_dir, tmp_path):
    """Pairs sampled by the model, a discriminator batch whose minibatch-std groups would straddle processes, and a
    run without a named folder: each one error line on every process, before anything is written."""
    base = _args(small_pixel_pipeline_dir, tmp_path, "dde")
    cases = [
        (["--method", "dde", "--out", str(tmp_path / "a"), *_sets(base + ["dde.pairs=online"])],
         "dde.pairs=online samples its pairs in every process"),
        (["--method", "ogdm", "--out", str(tmp_path / "b"),
          *_sets(_args(small_pixel_pipeline_dir, tmp_path, "ogdm")[:-2] + ["ogdm.batch_size=4", "ogdm.gamma=0.5"])],
         "splits the discriminator's minibatch-std groups of 4"),
        (["--method", "alignprop", *_sets(_args(small_pixel_pipeline_dir, tmp_path, "alignprop"))],
         "a run on several processes needs its folder named"),
    ]
    for i, (argv, expected) in enumerate(cases):
        r = _bench(["run", *argv], procs=2, port=_port(4 + i))
        errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode != 0 and len(errors) == 2 and all(expected in e for e in errors), r.stderr[-2000:]
    assert not any(os.path.exists(tmp_path / d) for d in ("a", "b"))
