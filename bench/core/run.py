"""The harness loop: one method on one reward and prompt set, evaluated, logged and checkpointed.

The loop, for every method alike::

    build: method, reward, prompt sets, evaluator (held-out metrics, judge), pipeline (frozen) + LoRA, Context
    evaluate at step 0 (fixed eval prompts x fixed seeds, deterministic DDIM; reused from bench.core.evalcache when
        another run already evaluated the same base model the same way), grid, checkpoint
    for step in 1..steps:
        metrics = method.step()                   # one optimizer update, the method's own recipe
        every eval.every steps, at eval.at and at the end: evaluate (+ grid every eval.grid_every)
        every checkpoint_every steps and at the end: checkpoint, metrics table, curve
    write the LoRA adapter, final grids, summary, manifest (status complete); print one summary line
    a companion run, if the method asks for one (OGDM's gamma = 0 baseline): run into <run>/baseline/, then the
        table comparing both (fd_nfe.*)

``start(cfg)`` builds and checks everything before the run folder is created; ``resume(run_dir)`` reloads the
run's resolved config and its last checkpoint (LoRA, method state, RNG state, cost counters, metrics rows) and
continues; with the same seed and thread count on CPU it ends with the same metrics as a run that was never
interrupted.  What a run survives:

- SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C): the current step finishes, a checkpoint is written, the
  manifest says ``interrupted`` and the process exits with status 75 (``EXIT_INTERRUPTED``); ``--resume`` goes on;
- a damaged last checkpoint (truncated, foreign): ``--resume`` falls back to the previous one
  (``checkpoint.prev.pt``) with one warning line, or names the files if neither is usable;
- non-finite rewards, losses or gradients: the update is skipped (``bench.core.context``), counted in
  ``skipped_updates``, and the run stops after ``nan_patience`` consecutive skips (manifest ``stopped``);
- a second writer: the folder's lock (``RunFolder.lock``) refuses it with one line naming the holder's pid;
- a reward server (``--reward http://HOST:PORT``) down past ``remote.max_wait_s``, or replying badly: the last whole
  step is checkpointed (from an in-memory copy of the run's state taken before each step: the LoRA and optimizer
  state, or every UNet weight under ``finetune: full``) and the run stops with one line (docs/reward-server.md).

The run folder's files are ``diffalign.store.RunFolder``'s; the evaluation is ``bench.core.evaluate``'s.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
import resource
import signal
import subprocess
import sys
import threading
import time
from importlib import metadata

import accelerate
import pandas as pd
import torch
from tqdm import tqdm

from bench.core import evalcache
from bench.core.config import Config, derive
from bench.core.context import Context, NonFiniteStop
from bench.core.evaluate import Evaluation, Evaluator
from bench.core.trackers import Trackers
from bench.outputs import fd_tables
from bench.outputs.plots import plot_run, save_before_after, save_grid
from diffalign import process
from diffalign.costs import Costs
from diffalign.errors import BenchError
from diffalign.lora import add_lora, load_lora_state_dict, lora_state_dict, make_full_finetune, save_lora
from diffalign.pipeline import RUN_MEMORY_FORMAT, load_pipeline
from diffalign.store import PROJECT_ROOT, RESULTS_ROOT, FollowerFolder, RunFolder, project_path, safe_name
from methods import method_module
from prompts import load_prompts
from rewards import get_reward
from rewards.remote import RemoteReward, RemoteRewardError, RewardUnavailable

COMPANION_DIR = "baseline"  # a method's companion run (OGDM's gamma = 0 baseline) inside its run folder
COLUMN_ORDER = ["step", "reward_mean", "reward_std", "eval_reward_mean", "eval_reward_std", "eval_reward_sem",
                "win_rate", "win_rate_sem", "fidelity", "fidelity_colour", "fidelity_shape", "fidelity_count",
                "kl_to_base", "images", "reward_queries", "unet_fwd", "unet_bwd", "wall_time", "peak_mem_mb"]
CRASH_ENV = "DIFFALIGN_CRASH_AFTER_STEP"  # tests: die like `kill -9` right after this step
CRASH_RANK_ENV = "DIFFALIGN_CRASH_RANK"  # tests: only this process of a data-parallel run dies
SIGNAL_ENV = "DIFFALIGN_SIGTERM_AFTER_STEP"  # tests: send this process SIGTERM right after this step's update
EXIT_INTERRUPTED = 75  # EX_TEMPFAIL: stopped by SIGTERM / SIGINT after a checkpoint; resume to continue
CHECKPOINT_KEYS = ("step", "lora", "method", "generator", "costs", "rows")
PROCESS_IS_THE_RUN = False  # set by `bench run`: this process was started for one run (its startup is measured)


class AlreadyStarted(BenchError):
    """The run folder already holds a run (another writer started it)."""


class Interrupted(Exception):
    """The run stopped on SIGTERM or SIGINT after checkpointing its current step (resumable)."""


def warn(message: str) -> None:
    print(message, file=sys.stderr)
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Run:
    """One run: built fully (and checked) before anything is written, then ``train()``."""

    def __init__(self, cfg: Config, folder: RunFolder):
        built = time.time()
        self.cfg, self.folder = cfg, folder
        self.method_module = method_module(cfg.method)
        reward = get_reward(cfg.reward, cfg.get("remote"))
        self.remote = isinstance(reward, RemoteReward)  # a reward server: its waits are logged, its faults survived
        if self.method_module.NEEDS_DIFFERENTIABLE_REWARD and not reward.differentiable:
            served = " (a reward server gives scores, no gradients)" if self.remote else ""
            raise BenchError(f"method {cfg.method!r} backpropagates the reward, but reward {cfg.reward!r} is not "
                             f"differentiable{served}; use a differentiable reward or a policy-gradient method")
        if self.remote:
            reward.connect()  # the server answers (within remote.max_wait_s) and serves scores, before anything runs
        self.evaluator = Evaluator(cfg, reward)
        train_prompts = load_prompts(cfg.train_prompts)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = device_of(cfg)
        another_precision(cfg.mixed_precision)
        accelerator = accelerate.Accelerator(cpu=self.device == "cpu", mixed_precision=cfg.mixed_precision,
                                             kwargs_handlers=[PROCESS_GROUP_TIMEOUT])
        cpu_fp16_scaler(accelerator)
        self.main, self.world = accelerator.is_main_process, accelerator.num_processes
        if self.world > 1:
            check_data_parallel(cfg, self.method_module, self.world)
            if not self.main:  # the main process alone writes the store
                self.folder = folder = FollowerFolder(folder.path)
        pipe = load_pipeline(project_path(cfg.model), device=accelerator.device, dtype=DTYPES[cfg.mixed_precision],
                             memory_format=RUN_MEMORY_FORMAT)
        if hasattr(reward, "to"):
            reward.to(accelerator.device)
        self.evaluator.to(accelerator.device)
        lc = cfg.lora
        if cfg.get("finetune", "lora") == "full":
            trainable = make_full_finetune(pipe.unet)
        else:
            trainable = add_lora(pipe.unet, lc.rank, lc.alpha, lc.targets, lc.init, seed=cfg.seed)
        self.ctx = Context(cfg=cfg, pipe=pipe, reward=reward, train_prompts=train_prompts,
                           generator=torch.Generator().manual_seed(cfg.seed), costs=Costs(),
                           accelerator=accelerator, trainable=trainable)
        self.evaluator.shard_over(self.ctx)  # several processes: each samples its share of the eval prompts
        self.method = self.method_module.Method(self.ctx)
        self.trackers = Trackers((cfg.get("trackers") or []) if self.main else [], folder.path,
                                 config=dict(cfg))  # checks packages now
        self.step = 0
        self.rows: list[dict] = []            # one per step: the metrics table
        self.first_eval: dict | None = None   # the step-0 evaluation (the summary's "before")
        self.eval_samples: list[dict] = []    # per eval image: step, prompt, seed, reward and held-out metrics
        self.wall_offset = 0.0                # wall time of earlier sessions of a resumed run
        self.eval_time = 0.0                  # seconds spent evaluating (all sessions)
        self.eval0_source = "computed"        # or "cache <key>": where the step-0 evaluation came from
        self.checkpointed_step = -1           # the step of the last checkpoint written by this process
        if getattr(pipe.unet, "kind", None) == "flux" and {cfg.sampler.guidance, cfg.eval.guidance} != {1.0}:
            raise BenchError(f"model {cfg.model!r} is FLUX-shaped: FLUX.1 runs without classifier-free guidance (its "
                             f"guidance is an input of the model, {pipe.unet.guidance}); accepted: sampler.guidance=1 "
                             f"and eval.guidance=1 (got {cfg.sampler.guidance:g} and {cfg.eval.guidance:g})")
        self.model_process = process.kind(pipe.scheduler)  # "ddpm" | "flow": shown on every output of a flow run
        self.model_label = f" ({os.path.basename(os.path.normpath(cfg.model))}, flow)" if self.model_process == "flow" \
            else ""
        self.build_s = time.time() - built    # this run built: models loaded and checked
        # process start -> this run built (the interpreter, every import, the build), when the process is this run's
        # own (``bench run``: PROCESS_IS_THE_RUN); None in a process that runs other things too (tests, a sweep)
        self.startup_s = process_age() if PROCESS_IS_THE_RUN else None

    # ---- state ----------------------------------------------------------------------------------------
    def wall(self) -> float:
        return self.wall_offset + (time.time() - self.t0)

    def checkpoint(self) -> None:
        self.folder.write_checkpoint(self.state())
        self.checkpointed_step = self.step
        self.write_tables()
        self.ctx.barrier()  # nobody goes on (or reads it) before the main process has written it

    def state(self) -> dict:
        """What a checkpoint holds: the run where it stands."""
        state = {"step": self.step, "lora": lora_state_dict(self.ctx.pipe.unet), "method": self.method.state_dict(),
                 "generator": self.ctx.generator.get_state(), "costs": self.ctx.costs.state_dict(),
                 "rows": self.rows, "wall": self.wall(), "first_eval": self.first_eval,
                 "eval_samples": self.eval_samples, "eval_time": self.eval_time,
                 "guard": {"skipped_updates": self.ctx.skipped_updates, "consecutive_skips": self.ctx.consecutive_skips,
                           "scaler_skips": self.ctx.scaler_skips}}
        if self.ctx.accelerator.scaler is not None:  # fp16: the gradient scaler's scale and growth tracker
            state["scaler"] = self.ctx.accelerator.scaler.state_dict()
        if self.remote:
            state["reward_stats"] = dict(self.ctx.reward.stats)
        return state

    def restore(self) -> None:
        state = self.folder.read_checkpoint(CHECKPOINT_KEYS, warn=warn)
        load_lora_state_dict(self.ctx.pipe.unet, state["lora"])
        self.method.load_state_dict(state["method"])
        self.ctx.generator.set_state(state["generator"])
        self.ctx.costs.load_state_dict(state["costs"])
        self.step, self.rows, self.first_eval = state["step"], state["rows"], state["first_eval"]
        self.eval_samples = state["eval_samples"]
        self.wall_offset = state["wall"]
        self.eval_time = state.get("eval_time", 0.0)
        guard = state.get("guard") or {"skipped_updates": (self.rows[-1].get("skipped_updates", 0) if self.rows else 0)}
        for k, v in guard.items():  # the non-finite guard's counters go on where they were (older checkpoints: rows)
            setattr(self.ctx, k, int(v))
        if self.ctx.accelerator.scaler is not None and "scaler" in state:
            self.ctx.accelerator.scaler.load_state_dict(state["scaler"])
        if self.remote and "reward_stats" in state:  # the waits, requests and retries of earlier sessions
            self.ctx.reward.stats.update(state["reward_stats"])

    def write_tables(self) -> None:
        if not self.main:
            return
        df = pd.DataFrame(self.rows)
        first = [c for c in COLUMN_ORDER if c in df]
        df = df[first + [c for c in df.columns if c not in first]]
        self.folder.write_metrics(df)
        if self.eval_samples:
            self.folder.write_eval_samples(pd.DataFrame(self.eval_samples))
        proxy = self.cfg.reward if getattr(self.ctx.reward, "gold", None) == "fidelity" else None  # the reward says
        plot_run(df, self.folder.curve_path, title=f"{self.cfg.method} on {self.cfg.reward}{self.model_label}",
                 proxy=proxy)

    # ---- one row of the metrics table -----------------------------------------------------------------
    def evaluate(self, grid: bool, final: bool = False) -> dict:
        t0 = time.time()
        base = [e["reward"] for e in self.eval_samples if e["step"] == 0]
        ev = self.evaluate_base() if self.step == 0 else self.evaluator(self.ctx.pipe, self.step, base, final)
        self.eval_samples += ev.samples
        if grid and self.main:
            save_grid(ev.images, ev.prompts, self.cfg.eval.num_seeds, self.folder.grid_path(self.step),
                      title=f"{self.cfg.method} / {self.cfg.reward} / step {self.step}")
        self.eval_time += time.time() - t0
        return ev.metrics

    def evaluate_base(self) -> Evaluation:
        """The step-0 evaluation (the base model), from the cache when the same evaluation was made before (never for
        a reward server: its address does not say which reward answers there)."""
        if self.remote:
            return self.evaluator(self.ctx.pipe, 0, None, final=False, base_model_itself=True)
        key = evalcache.key(self.cfg, self.ctx.pipe.path, self.device)
        hit = evalcache.load(key)
        if hit is not None:
            self.eval0_source = f"cache {key}"
            return Evaluation(hit["metrics"], hit["samples"], hit["images"].float() / 255, hit["prompts"])
        ev = self.evaluator(self.ctx.pipe, 0, None, final=False, base_model_itself=True)
        u8 = (ev.images.float().clamp(0, 1) * 255).round().to(torch.uint8)  # what the grids store
        if self.main:
            evalcache.save(key, {"metrics": ev.metrics, "samples": ev.samples, "images": u8, "prompts": ev.prompts})
        return ev

    def record(self, metrics: dict, eval_metrics: dict | None) -> None:
        c = self.ctx.global_costs()
        row = {"step": self.step, **metrics, **self.ctx.pop_reward_terms(), **(eval_metrics or {}),
               "images": c["images"], "reward_queries": c["reward_queries"], "unet_fwd": c["unet_fwd"],
               "unet_bwd": c["unet_bwd"],
               "wall_time": self.wall(), "peak_mem_mb": peak_memory_mb(self.device),
               "skipped_updates": self.ctx.skipped_updates, **self.reward_columns(),
               **({"scaler_skips": self.ctx.scaler_skips} if self.ctx.accelerator.scaler is not None else {})}
        self.rows.append(row)
        self.trackers.log(row, self.step)

    def reward_columns(self) -> dict:
        """A reward server's cumulative cost: seconds waited on it (retries and back-off included), HTTP requests
        made, retries (training and evaluation calls of the training reward together); none in-process."""
        if not self.remote:
            return {}
        st = self.ctx.reward.stats
        return {"reward_wait_s": float(st["wait_s"]), "reward_requests": int(st["requests"]),
                "reward_retries": int(st["retries"])}

    def stop_on_reward(self, e: RemoteRewardError, snapshot: dict | None):
        """The reward server failed this step (down past remote.max_wait_s, or a bad reply): the last whole step is
        checkpointed (``snapshot``, taken before this step began, unless it is the checkpoint already written) and the
        run stops with one line; ``--resume`` redoes this step from there."""
        if snapshot is not None and snapshot["step"] != self.checkpointed_step:
            snapshot["reward_stats"] = dict(self.ctx.reward.stats)
            self.rows, self.eval_samples = snapshot["rows"], snapshot["eval_samples"]
            self.folder.write_checkpoint(snapshot)
            self.checkpointed_step = snapshot["step"]
            self.write_tables()
        at = snapshot["step"] if snapshot is not None else None
        self.folder.update_manifest(status="interrupted", interrupted={"reward": str(e), "step": at, "time": now()})
        where = (f"checkpointed at step {at}" if at is not None and self.folder.has_checkpoint()
                 else "no step was complete")
        again = f"continue with 'bench run --resume {self.folder.path}'"
        if isinstance(e, RewardUnavailable):
            return Interrupted(f"{e}; {where}; {again} once the server answers")
        return BenchError(f"{e}; {where}; {again} once the server replies with a score per image")

    # ---- the loop -------------------------------------------------------------------------------------
    def train(self, resumed: bool = False) -> dict:
        """The loop, with SIGTERM / SIGINT turned into a checkpoint and a clean stop after the current step."""
        self.signalled: str | None = None
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            def on_signal(signum, frame):
                self.signalled = signal.Signals(signum).name

            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, on_signal)
        try:
            return self._train(resumed)
        except NonFiniteStop as e:
            self.folder.update_manifest(status="stopped", reason=str(e), end_time=now())
            raise
        finally:
            for sig, old in handlers.items():
                signal.signal(sig, old)

    def _train(self, resumed: bool) -> dict:
        self._snapshot = None  # a remote reward: the run as it stood before the current step (see stop_on_reward)
        try:
            return self._loop(resumed)
        except RemoteRewardError as e:
            raise self.stop_on_reward(e, self._snapshot) from None

    def _loop(self, resumed: bool) -> dict:
        cfg = self.cfg
        self.t0 = time.time()
        # 1. the base model's evaluation (step 0), its grid and a first checkpoint
        if not resumed:
            self.first_eval = self.evaluate(grid=True)
            self.record({}, self.first_eval)
            self.checkpoint()
        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        signal_after = int(os.environ.get(SIGNAL_ENV, "0") or 0)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method}", unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0, disable=not self.main)
        try:
            while self.step < cfg.steps:
                if self.signalled:
                    self.interrupt()
                if self.remote:  # what a failed reward call rolls back to (the LoRA and optimizer state: small)
                    self._snapshot = copy.deepcopy(self.state())
                self.step += 1
                self.ctx.step = self.step
                # 2. one optimizer update, the method's own recipe
                with self.ctx.accelerator.autocast():
                    metrics = self.ctx.mean_metrics(self.method.step())  # several processes: averaged over them
                if signal_after and self.step == signal_after:
                    os.kill(os.getpid(), signal.SIGTERM)  # the real signal, as a scheduler sends it
                # 3. evaluate every eval.every steps, at the steps of eval.at and at the end
                last = self.step == cfg.steps
                ev = None
                if self.step % cfg.eval.every == 0 or self.step in cfg.eval.at or last:
                    ev = self.evaluate(grid=self.step % cfg.eval.grid_every == 0 or last, final=last)
                self.record(metrics, ev)
                bar.update(1)
                bar.set_postfix(progress_postfix(metrics), refresh=False)
                # 4. checkpoint every checkpoint_every steps and at the end
                if self.step % cfg.checkpoint_every == 0 or last:
                    self.checkpoint()
                if crash_after and self.step == crash_after and os.environ.get(CRASH_RANK_ENV, str(self.ctx.rank)) \
                        == str(self.ctx.rank):
                    os._exit(137)
        finally:
            bar.close()  # before any error line, so that line starts a line of its own
        return self.finish()  # a signal after the last step: finishing takes seconds, so the run completes

    def interrupt(self) -> None:
        """Checkpoint where the loop stands (unless it just did) and stop: the manifest says interrupted."""
        if self.checkpointed_step != self.step:
            self.checkpoint()
        self.folder.update_manifest(status="interrupted", interrupted={"signal": self.signalled, "step": self.step,
                                                                       "time": now()})
        raise Interrupted(f"{self.signalled} at step {self.step}: checkpointed; continue with 'bench run --resume "
                          f"{self.folder.path}'")

    def finish(self) -> dict:
        cfg, folder = self.cfg, self.folder
        summary = self.evaluator.summary(self.first_eval, self.rows[-1], self.eval_samples, self.step)
        summary.update(eval_time_s=self.eval_time, train_time_s=self.wall() - self.eval_time,
                       startup_s=self.startup_s, build_s=self.build_s,
                       model=os.path.basename(os.path.normpath(cfg.model)), model_process=self.model_process)
        if not self.main:
            self.ctx.barrier()  # the main process writes what follows
            return summary
        save_lora(self.ctx.pipe.unet, folder.lora_path, {
            "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": cfg.lora.targets, "base_model": cfg.model,
            "method": cfg.method, "variant": cfg.variant, "step": self.step})
        save_before_after(folder.grid_path(0), folder.grid_path(self.step), folder.start_vs_end_path)
        folder.write_summary(summary)
        fd_tables.write(folder.path, fd_tables.fd_rows(pd.DataFrame(self.rows), cfg.method, True),
                              f"{cfg.method} on {cfg.reward}{self.model_label}")
        self.trackers.close()
        folder.update_manifest(status="complete", end_time=now(), eval0=self.eval0_source)
        self.ctx.barrier()
        return summary


def progress_postfix(metrics: dict) -> dict[str, str]:
    """The progress bar's metric: the training batch's reward where the method reports one (the sampling methods),
    else its loss (the preference methods), else none: never a nan for a metric the method does not return."""
    for key, label in (("reward_mean", "reward"), ("loss", "loss")):
        if key in metrics:
            return {label: f"{float(metrics[key]):.4f}"}
    return {}


def new_run_dir(cfg: Config, root: str | None = None) -> str:
    root = root or os.path.join(RESULTS_ROOT, "runs")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = safe_name(f"{cfg.method}-{cfg.reward}-seed{cfg.seed}-{stamp}" + (f"-{cfg.tag}" if cfg.tag else ""))
    path, i = os.path.join(root, name), 1
    while os.path.exists(path):
        i += 1
        path = os.path.join(root, f"{name}-{i}")
    return path


def start(cfg: Config, run_dir: str | None = None, locked: bool = False) -> tuple[str, dict]:
    """A new run of a resolved config: everything is loaded and checked before the run folder is created.
    ``locked``: the caller already holds the folder's writer lock (a sweep)."""
    if run_dir is None and launched_processes() > 1:
        raise BenchError("a run on several processes needs its folder named: accepted: bench run ... --out RUN_DIR "
                         "(the same for every process)")
    run_dir = run_dir or new_run_dir(cfg)
    folder = RunFolder(run_dir)
    if folder.holds_run():
        raise BenchError(f"run folder {run_dir!r} already holds a run; accepted: a new folder, or "
                         f"'bench run --resume {run_dir}' to continue it")
    run = Run(cfg, folder)
    run.ctx.barrier()  # every process has checked the folder before the main one writes in it
    folder = run.folder
    with contextlib.nullcontext() if locked else folder.lock(warn):
        if run.main and folder.holds_run():  # another writer started it while this one was building
            raise AlreadyStarted(f"run folder {run_dir!r} already holds a run; accepted: a new folder, or "
                                 f"'bench run --resume {run_dir}' to continue it")
        folder.write_config(cfg)
        folder.update_manifest(status="running", start_time=now(), seed=cfg.seed, device=run.device,
                               device_name=device_name(run.device), torch_threads=torch.get_num_threads(),
                               memory_format=str(RUN_MEMORY_FORMAT).removeprefix("torch."),
                               model_process=run.model_process,
                               sampler_variant=process.sampler_variant(run.ctx.pipe.scheduler, cfg.sampler.eta),
                               model_architecture=getattr(run.ctx.pipe.unet, "kind", "unet"),
                               git=git_commit(), versions=versions(), method=cfg.method, variant=cfg.variant,
                               reward=cfg.reward, argv=sys.argv, host=platform.node(), processes=run.world)
        summary = run.train()
    return run_dir, companion(run_dir, cfg, summary)


def resume(run_dir: str, locked: bool = False) -> tuple[str, dict]:
    """Continue a run from its last checkpoint (a complete run returns its summary).  ``locked``: the caller
    already holds the folder's writer lock (a sweep)."""
    folder = RunFolder(run_dir)
    if not os.path.isfile(folder.config_path):
        raise BenchError(f"no run folder at {run_dir!r} (no config.yaml); accepted: a run folder written by bench run "
                         "(any path)")
    run = Run(Config(folder.read_config()), folder)
    manifest = folder.read_manifest()
    if manifest.get("processes", 1) != run.world and manifest.get("status") != "complete":
        raise BenchError(f"run {run_dir!r} ran on {manifest.get('processes', 1)} process(es) and is resumed on "
                         f"{run.world}; accepted: resume it with the same number of processes "
                         f"({manifest.get('processes', 1)}), which its checkpoint and sample streams assume")
    run.ctx.barrier()
    folder = run.folder
    with contextlib.nullcontext() if locked else folder.lock(warn):
        if manifest.get("status") == "complete":
            summary = folder.read_summary()
        else:
            resumed = folder.has_checkpoint()
            if resumed:
                run.restore()
            folder.update_manifest(status="running", resumes=manifest.get("resumes", []) + [
                {"time": now(), "from_step": run.step}])
            summary = run.train(resumed=resumed)
    return run_dir, companion(run_dir, run.cfg, summary)


def companion(run_dir: str, cfg: Config, summary: dict) -> dict:
    """The method's companion run, if it asks for one (``companion_baseline(cfg)``: overrides of this run's config,
    e.g. OGDM's gamma = 0 baseline): started, resumed or found complete in ``<run_dir>/baseline``; then the Frechet
    distance table of base model, baseline and this run.  Returns the summary with the baseline's under
    ``baseline``."""
    ask = method_module(cfg.method).companion_baseline
    overrides = ask(cfg) if ask is not None else None
    if not overrides:
        return summary
    sub = os.path.join(run_dir, COMPANION_DIR)
    folder = RunFolder(sub)
    state = folder.status()
    if state == "complete":
        base_summary = folder.read_summary()
    elif state == "interrupted":
        base_summary = resume(sub)[1]
    else:
        base_summary = start(derive(cfg, overrides), sub)[1]
    main_metrics, base_metrics = RunFolder(run_dir).read_metrics(), folder.read_metrics()
    base_cfg = Config(folder.read_config())
    rows = (fd_tables.fd_rows(main_metrics, "base model", True)[:1]
            + fd_tables.fd_rows(base_metrics, base_cfg.variant, False)
            + fd_tables.fd_rows(main_metrics, cfg.variant, False))
    fd_tables.write(run_dir, rows, f"{cfg.method} and its baseline on {cfg.reward}")
    return {**summary, "baseline": {"variant": base_cfg.variant, **base_summary}}


# ---- the manifest's provenance ------------------------------------------------------------------------------

PROCESS_GROUP_TIMEOUT = accelerate.utils.InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=300))


def launched_processes() -> int:
    """How many processes ``torchrun`` / ``accelerate launch`` started for this run (1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def is_collective_failure(e: BaseException) -> bool:
    """A failed collective operation (a peer process died or hung), as torch.distributed reports it."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e)
    return isinstance(e, dist_error) or any(k in text for k in ("gloo", "Gloo", "NCCL", "Connection closed",
                                                                  "Connection reset", "timed out"))


def check_data_parallel(cfg: Config, module, world: int) -> None:
    """Several processes: the method's ``data_parallel(cfg, world)`` says whether this config splits over them."""
    why = module.data_parallel(cfg, world)
    if why:
        raise BenchError(f"method {cfg.method!r} on {world} processes: {why}; or run it on one process")


def another_precision(mixed_precision: str) -> None:
    """Let a second run in the same process use another ``mixed_precision``: accelerate keeps one process-wide
    state and refuses to change its precision, so a one-process state of another precision is cleared first (the
    process group of a launched run, accelerate's ``PartialState``, is kept)."""
    state = accelerate.state.AcceleratorState._shared_state
    if state and state.get("_mixed_precision") not in (None, mixed_precision):
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=False)


def cpu_fp16_scaler(accelerator) -> None:
    """fp16 on the CPU runs the GPU's scaled path: accelerate builds a ``GradScaler`` and fp16 autocast only for an
    accelerator device, so on the CPU the harness hands it torch's CPU ``GradScaler`` and turns its autocast on (the
    loss is scaled in ``backward``, unscaled in ``clip_grad_norm_``, the update made or skipped by the scaler)."""
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu" and accelerator.scaler is None:
        accelerator.scaler = torch.amp.GradScaler("cpu")
        accelerator.native_amp = True


def process_age() -> float | None:
    """Seconds since this process started (Linux's /proc; None elsewhere): what a run costs before its loop, the
    interpreter's start and every import included."""
    try:
        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime, in clock ticks
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])  # seconds since boot, the clock starttime counts on
        return uptime - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def device_of(cfg: Config) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device 'cuda' was asked for but no CUDA GPU is visible; accepted: auto, cpu, cuda")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def git_commit() -> dict:
    def git(*args):
        r = subprocess.run(["git", "-C", PROJECT_ROOT, *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pandas", "open_clip_torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
