"""What a run survives: damaged checkpoints and files, SIGTERM, non-finite values, two writers, two sweep drivers.
Each case ends in a resumable folder, the same metrics as an uninterrupted run, or one line naming the problem."""
import json
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch
from conftest import ROOT, VOLATILE, error_line, metrics_of, small_run_args

from bench import cli
from bench.core import run
from bench.core.config import resolve
from bench.core.context import GuardedOptimizer
from diffalign.store import RunFolder

NAN_REWARD = textwrap.dedent('''
    """A reward that is NaN on chosen calls (NAN_CALLS, 1-based, comma-separated): saturation otherwise."""
    import os
    import torch

    class NanOnCalls:
        name, differentiable = "nan-on-calls", True

        def __init__(self):
            self.calls = 0

        def __call__(self, images, prompts):
            self.calls += 1
            score = images.amax(1).mean((1, 2)) - images.amin(1).mean((1, 2))
            bad = {int(c) for c in os.environ.get("NAN_CALLS", "").split(",") if c}
            return score * float("nan") if self.calls in bad else score
''')


def _args(pipe_dir, tmp_path, *extra):
    return small_run_args(pipe_dir, tmp_path) + ["reward=saturation", "eval.metrics=[tiny-clip]",
                                                 "alignprop.batch_size=2", *extra]


def _manifest(path):
    return json.load(open(os.path.join(path, "manifest.json")))


def _subprocess(args, env=None):
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_sigterm_checkpoints_marks_interrupted_and_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    args = _args(small_pixel_pipeline_dir, tmp_path)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run.start(resolve("alignprop", args), full)
    proc = _subprocess(["run", "--method", "alignprop", "--out", cut] + args, {run.SIGNAL_ENV: "3"})
    assert proc.returncode == run.EXIT_INTERRUPTED, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith("interrupted:")] == [
        f"interrupted: SIGTERM at step 3: checkpointed; continue with 'bench run --resume {cut}'"]
    m = _manifest(cut)
    assert m["status"] == "interrupted" and m["interrupted"]["step"] == 3
    assert RunFolder(cut).read_checkpoint()["step"] == 3  # step 3's update was kept, not lost
    assert cli.main(["run", "--resume", cut]) == 0
    pd.testing.assert_frame_equal(metrics_of(full).drop(columns=VOLATILE), metrics_of(cut).drop(columns=VOLATILE))


@pytest.mark.slow
def test_a_damaged_checkpoint_falls_back_to_the_previous_one(small_pixel_pipeline_dir, tmp_path, capsys):
    args = _args(small_pixel_pipeline_dir, tmp_path)
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    run.start(resolve("alignprop", args), full)
    proc = _subprocess(["run", "--method", "alignprop", "--out", cut] + args, {run.CRASH_ENV: "3"})
    assert proc.returncode == 137
    folder = RunFolder(cut)
    assert torch.load(folder.previous_checkpoint_path, weights_only=False)["step"] == 0  # the rotation kept it
    with open(folder.checkpoint_path, "r+b") as f:  # a bad copy or a full disk: the file cut short
        f.truncate(os.path.getsize(folder.checkpoint_path) // 2)
    assert cli.main(["run", "--resume", cut]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "took over the lock left by process" in warnings[0]  # the killed writer's
    assert "checkpoint.pt' is damaged" in warnings[1] and "resuming from checkpoint.prev.pt (step 0)" in warnings[1]
    pd.testing.assert_frame_equal(metrics_of(full).drop(columns=VOLATILE), metrics_of(cut).drop(columns=VOLATILE))
    # with nothing usable left: one line naming the files
    folder.update_manifest(status="running")
    for path in (folder.checkpoint_path, folder.previous_checkpoint_path):
        with open(path, "wb") as f:
            f.write(b"PK\x03\x04 not a checkpoint")
    line = error_line(capsys, ["run", "--resume", cut])
    assert "has no usable checkpoint (checkpoint.pt:" in line and "checkpoint.prev.pt:" in line


def test_damaged_metrics_or_manifest_are_skipped_by_the_comparison_tools(small_pixel_pipeline_dir, tmp_path, capsys):
    args = _args(small_pixel_pipeline_dir, tmp_path, "steps=2")
    root = tmp_path / "sweep"
    for seed in (0, 1, 2):
        run.start(resolve("alignprop", args + [f"seed={seed}"]), str(root / f"run{seed}"))
    with open(root / "run1" / "metrics.parquet", "r+b") as f:
        f.truncate(100)
    (root / "run2" / "manifest.json").write_text('{"status": "compl')
    capsys.readouterr()
    assert cli.main(["table", str(root), "--out", str(tmp_path / "t")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("skipped run ") and "is damaged" in line for line in err)
    assert "metrics.parquet" in err[0] and "manifest.json" in err[1]
    assert cli.main(["compare", str(root), "--out", str(tmp_path / "c.png")]) == 0
    (root / "run0" / "config.yaml").write_text("{unclosed: [")
    line = error_line(capsys, ["report", str(root), "--out", str(tmp_path / "r.html")])
    assert "no readable run under" in line


def _nan_context(pipe_dir, tmp_path, monkeypatch, calls: str, *extra):
    monkeypatch.setenv("DIFFALIGN_EVAL_CACHE", "0")  # the step-0 evaluation is the reward's first call
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "nan_reward.py").write_text(NAN_REWARD)
    monkeypatch.setenv("NAN_CALLS", calls)
    return _args(pipe_dir, tmp_path, "reward=nan_reward:NanOnCalls", *extra)


def test_a_nan_reward_skips_that_update_and_nothing_reaches_the_weights(small_pixel_pipeline_dir, tmp_path,
                                                                        monkeypatch):
    from conftest import method_context

    from diffalign.lora import add_lora
    from diffalign.pipeline import load_pipeline
    from methods import alignprop
    from rewards import get_reward

    args = _nan_context(small_pixel_pipeline_dir, tmp_path, monkeypatch, "2")
    cfg = resolve("alignprop", args + ["model=x"])
    pipe = load_pipeline(small_pixel_pipeline_dir)
    ctx = method_context(cfg, pipe, add_lora(pipe.unet, 4, 4.0, seed=0), get_reward("nan_reward:NanOnCalls"))
    m = alignprop.Method(ctx)
    m.step()
    after_1 = [p.detach().clone() for p in ctx.trainable]
    adam_1 = {k: v["step"].clone() for k, v in m.opt.state_dict()["state"].items()}
    m.step()  # NaN reward: skipped
    assert ctx.skipped_updates == 1 and all(torch.equal(a, p) for a, p in zip(after_1, ctx.trainable))
    assert {k: v["step"] for k, v in m.opt.state_dict()["state"].items()} == adam_1  # Adam's state untouched
    assert all(p.grad is None for p in ctx.trainable)
    m.step()
    assert ctx.skipped_updates == 1 and ctx.consecutive_skips == 0
    assert not all(torch.equal(a, p) for a, p in zip(after_1, ctx.trainable))  # the next finite step trains
    # a NaN gradient on its own (no flagged reward or loss) is caught by the guarded step
    w = torch.nn.Parameter(torch.ones(2))
    opt = GuardedOptimizer(torch.optim.AdamW([w], lr=0.1), ctx)
    w.grad = torch.tensor([1.0, float("nan")])
    assert opt.step() is False and torch.equal(w.detach(), torch.ones(2)) and ctx.skipped_updates == 2


@pytest.mark.slow
def test_nan_rewards_are_counted_and_stop_the_run_after_the_patience(small_pixel_pipeline_dir, tmp_path, monkeypatch,
                                                                      capsys):
    # the reward's calls in a run: 1 = the step-0 evaluation, 2 = step 1, 3 = step 2, 4 = the step-2 evaluation, ...
    args = _nan_context(small_pixel_pipeline_dir, tmp_path, monkeypatch, "3")
    out = str(tmp_path / "skip")
    run.start(resolve("alignprop", args), out)
    assert list(metrics_of(out)["skipped_updates"]) == [0, 0, 1, 1, 1]  # step 2's update skipped, the run goes on
    assert _manifest(out)["status"] == "complete"
    args = _nan_context(small_pixel_pipeline_dir, tmp_path, monkeypatch, "2,3", "nan_patience=2")
    stopped = str(tmp_path / "patience")
    line = error_line(capsys, ["run", "--method", "alignprop", "--out", stopped, "--set"] + args)
    assert "step 2: non-finite reward; the run stopped (2 consecutive updates skipped" in line
    assert _manifest(stopped)["status"] == "stopped"
    args = _nan_context(small_pixel_pipeline_dir, tmp_path, monkeypatch, "3", "nan_policy=stop")
    line = error_line(capsys, ["run", "--method", "alignprop", "--out", str(tmp_path / "stop"), "--set"] + args)
    assert "step 2: non-finite reward; the run stopped (nan_policy stop" in line


def test_a_second_writer_is_refused_and_a_stale_lock_is_taken_over(small_pixel_pipeline_dir, tmp_path, capsys):
    args = _args(small_pixel_pipeline_dir, tmp_path, "steps=2")
    out = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-m", "bench", "run", "--method", "alignprop", "--out", out] + args,
                            cwd=ROOT, env={**os.environ, run.CRASH_ENV: "1"}, stderr=subprocess.DEVNULL)
    assert proc.wait(timeout=300) == 137  # killed: its lock file (with its pid) is left behind, the lock is not
    folder = RunFolder(out)
    assert open(folder.file(".lock")).read().strip() == str(proc.pid) and folder.locked_by() is None
    with folder.lock():
        assert folder.locked_by() == str(os.getpid())
        line = error_line(capsys, ["run", "--resume", out])
        assert f"is being written by process {os.getpid()}" in line and "one writer per run folder" in line
    with open(folder.file(".lock"), "w") as f:
        f.write("999999")  # a writer that died holding nothing
    assert cli.main(["run", "--resume", out]) == 0
    err = capsys.readouterr().err
    assert "took over the lock left by process 999999" in err and _manifest(out)["status"] == "complete"


@pytest.mark.slow
def test_two_sweep_drivers_share_a_sweep_and_run_each_run_once(small_pixel_pipeline_dir, tmp_path):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(json.dumps({
        "methods": ["alignprop"], "seeds": [0, 1, 2, 3], "root": str(tmp_path / "root"),
        "set": [f"model={small_pixel_pipeline_dir}", f"eval_prompts={prompts}", "steps=2", "eval.every=2",
                "eval.num_seeds=2", "eval.num_steps=2", "sampler.num_steps=2", "reward=saturation",
                "eval.metrics=[tiny-clip]", "alignprop.batch_size=2", "threads=1"]}))
    cmd = [sys.executable, "-m", "bench", "sweep", "--file", str(sweep)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    ran = [line for out in outs for line in out.splitlines() if line.endswith(": running")]
    assert len(ran) == 4, outs  # every run started once, by one driver or the other
    for d in os.listdir(tmp_path / "root"):
        if d.startswith("alignprop-"):
            m = _manifest(tmp_path / "root" / d)
            assert m["status"] == "complete" and "resumes" not in m


def _fp16_context(overrides=()):
    """A Context on an fp16 accelerator with the CPU GradScaler the harness gives it (``run.cpu_fp16_scaler``):
    accelerate's own scaled path (loss scaled in backward, unscaled in clip_grad_norm_, step and update by the
    scaler), driven on one float32 parameter."""
    import accelerate

    from bench.core.context import Context
    from diffalign.costs import Costs

    run.another_precision("fp16")
    acc = accelerate.Accelerator(cpu=True, mixed_precision="fp16")
    run.cpu_fp16_scaler(acc)
    w = torch.nn.Parameter(torch.ones(3))
    ctx = Context(cfg=resolve("alignprop", ["model=x", *overrides]), pipe=None, reward=None, train_prompts=[],
                  generator=torch.Generator().manual_seed(0), costs=Costs(), accelerator=acc, trainable=[w])
    return ctx, ctx.guard(torch.optim.SGD([w], lr=0.1)), w, acc.scaler


def _update(ctx, opt, w, loss_of=lambda w: (w ** 2).sum(), flag: str | None = None) -> bool:
    ctx.backward(loss_of(w))
    ctx.clip_grad(10.0)  # accelerate unscales the gradients here
    if flag:
        ctx.nonfinite.append(flag)  # what a non-finite reward does (Context.score)
    made = opt.step()
    opt.zero_grad(set_to_none=True)
    return made


def test_fp16_a_skipped_update_leaves_the_scaler_ready_for_the_next():
    """Issue 26's third defect: the guard skipped an update after accelerate had unscaled the gradients and never let
    the scaler update, so the next update's unscale_() raised "unscale_() has already been called"."""
    ctx, opt, w, scaler = _fp16_context()
    assert _update(ctx, opt, w) and torch.allclose(w.detach(), torch.full((3,), 0.8))
    assert _update(ctx, opt, w, flag="reward") is False and ctx.skipped_updates == 1
    assert torch.allclose(w.detach(), torch.full((3,), 0.8))  # nothing of the skipped update reached the weight
    assert _update(ctx, opt, w) and torch.allclose(w.detach(), torch.full((3,), 0.64))  # before the fix: raised
    assert ctx.consecutive_skips == 0 and scaler.get_scale() == 65536.0


def test_fp16_overflows_are_the_scalers_to_skip_and_not_the_nan_guards():
    """An fp16 overflow (an infinite scaled gradient) is routine at start-up: the scaler skips that update and halves
    its scale; the guard neither counts it as a non-finite skip nor stops the run after nan_patience of them."""
    ctx, opt, w, scaler = _fp16_context(["nan_patience=2"])
    for _ in range(3):  # more overflows in a row than the patience
        assert _update(ctx, opt, w, loss_of=lambda w: (w * 1e38).sum()) is False
    assert ctx.skipped_updates == 0 and ctx.scaler_skips == 3 and scaler.get_scale() == 65536.0 / 8
    assert torch.equal(w.detach(), torch.ones(3))
    assert _update(ctx, opt, w) and torch.allclose(w.detach(), torch.full((3,), 0.8))


def test_a_resumed_run_keeps_the_guards_counts(small_pixel_pipeline_dir, tmp_path):
    """skipped_updates (a metrics column), the consecutive skips that nan_patience counts and fp16's scaler_skips go
    on from the checkpoint, instead of starting again at 0 in the resumed process."""
    cfg = resolve("alignprop", small_run_args(small_pixel_pipeline_dir, tmp_path))
    first = run.Run(cfg, RunFolder(str(tmp_path / "r")))
    os.makedirs(first.folder.path)
    first.t0, first.first_eval = 0.0, {}
    first.ctx.skipped_updates, first.ctx.consecutive_skips, first.ctx.scaler_skips = 3, 2, 5
    first.checkpoint()
    again = run.Run(cfg, RunFolder(str(tmp_path / "r")))
    again.restore()
    assert (again.ctx.skipped_updates, again.ctx.consecutive_skips, again.ctx.scaler_skips) == (3, 2, 5)
