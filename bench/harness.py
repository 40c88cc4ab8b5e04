"""The harness: runs one method on one reward and prompt set, evaluates, logs and checkpoints.

The loop, for every method alike::

    load pipeline (frozen) + LoRA, reward, prompt sets, judge
    evaluate at step 0 (fixed eval prompts x fixed seeds, deterministic DDIM), grid, checkpoint
    for step in 1..steps:
        metrics = method.step()                   # one optimizer update, the method's own recipe
        every eval.every steps and at the end: evaluate (+ grid every eval.grid_every)
        every checkpoint_every steps and at the end: checkpoint, metrics table, curve
    write the LoRA adapter, final grids, manifest (status complete) and print one summary line

``resume(run_dir)`` reloads the run's resolved config and its last checkpoint (LoRA, optimizer,
RNG state, cost counters, metrics rows) and continues; with the same seed on CPU it ends with the
same metrics as a run that was never interrupted.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np
import torch

from bench import store
from bench.config import Config, dump
from bench.costs import Costs
from bench.errors import BenchError

COLUMN_ORDER = ["step", "reward_mean", "reward_std", "eval_reward_mean", "eval_reward_std", "eval_reward_sem",
                "fidelity", "fidelity_colour", "fidelity_shape", "fidelity_count", "kl_to_base", "images", "reward_queries",
                "unet_fwd", "unet_bwd", "wall_time", "peak_mem_mb"]
CRASH_ENV = "DIFFALIGN_CRASH_AFTER_STEP"  # tests: die like `kill -9` right after this step
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Context:
    """What a method gets: the frozen pipeline with its LoRA, the reward, prompts, RNG and counters."""

    cfg: Config
    pipe: object
    reward: object
    train_prompts: list[str]
    generator: torch.Generator
    costs: Costs
    accelerator: object
    trainable: list[torch.nn.Parameter]
    reward_terms: dict = dataclasses.field(default_factory=dict)

    @property
    def method_cfg(self) -> Config:
        return getattr(self.cfg, self.cfg.method_key)

    def draw_prompts(self, n: int, distinct: int = 0) -> list[str]:
        """n training prompts drawn with replacement; with ``distinct`` = k > 0, k prompts each repeated n / k
        times in a row (groups of samples per prompt, for per-prompt advantages within the round)."""
        if not distinct:
            idx = torch.randint(0, len(self.train_prompts), (n,), generator=self.generator)
            return [self.train_prompts[i] for i in idx.tolist()]
        return [p for p in self.draw_prompts(distinct) for _ in range(n // distinct)]

    def noise(self, n: int) -> torch.Tensor:
        from bench.sampling import initial_noise

        return initial_noise(self.pipe, n, self.generator)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        self.costs.reward_queries += images.shape[0]
        scores = self.reward(images, prompts).to(images.device)
        for name, s in getattr(self.reward, "last_terms", {}).items():  # a weighted sum: each term on its own
            self.reward_terms.setdefault(name, []).append(s.detach().float().cpu())
        return scores

    def pop_reward_terms(self) -> dict:
        """Mean of each term of a weighted-sum reward over this step's queries (``reward/<name>``)."""
        out = {f"reward/{k}": float(torch.cat(v).mean()) for k, v in self.reward_terms.items()}
        self.reward_terms.clear()
        return out

    def adamw(self) -> torch.optim.Optimizer:
        """AdamW over the LoRA weights, from the method's lr, adam_betas, adam_eps and weight_decay."""
        c = self.method_cfg
        opt = torch.optim.AdamW(self.trainable, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps,
                                weight_decay=c.weight_decay)
        return self.accelerator.prepare(opt)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad(self, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(self.trainable, max_norm))


def project_path(path: str | None) -> str | None:
    """A relative path as given when it exists from here, else relative to the project root
    (so the committed tiny world is found from any working directory)."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(REPO_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def _device(cfg: Config) -> str:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchError("device 'cuda' was asked for but no CUDA GPU is visible; accepted: auto, cpu, cuda")
    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _git_commit() -> dict:
    def git(*args):
        r = subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None, "dirty": None}


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pandas", "open_clip_torch"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Run:
    """One run folder and everything the loop needs; built fully before anything is written."""

    def __init__(self, cfg: Config, run_dir: str):
        import accelerate

        from bench.judge import load_judge
        from bench.lora import add_lora
        from bench.pipeline import load_pipeline
        from methods import get_method
        from prompts import load_prompts
        from rewards import get_reward

        self.cfg, self.run_dir = cfg, run_dir
        self.module = get_method(cfg.method)
        self.reward = get_reward(cfg.reward)
        if self.module.NEEDS_DIFFERENTIABLE_REWARD and not self.reward.differentiable:
            raise BenchError(f"method {cfg.method!r} backpropagates the reward, but reward {cfg.reward!r} is not "
                             "differentiable; use a differentiable reward or a policy-gradient method")
        # held-out metrics: rewards scored on the eval images but never trained on (reward hacking shows here)
        self.heldout = {spec: get_reward(spec) for spec in cfg.eval.metrics if spec != cfg.reward}
        self.train_prompts = load_prompts(cfg.train_prompts)
        self.eval_prompts = load_prompts(cfg.eval_prompts)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = _device(cfg)
        if cfg.mixed_precision != "no" and self.device != "cuda":
            raise BenchError(f"mixed_precision {cfg.mixed_precision!r} needs a CUDA GPU; accepted on CPU: no")
        dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
        self.accelerator = accelerate.Accelerator(cpu=self.device == "cpu", mixed_precision=cfg.mixed_precision)
        self.pipe = load_pipeline(project_path(cfg.model), device=self.accelerator.device, dtype=dtype)
        for r in [self.reward, *self.heldout.values()]:
            if hasattr(r, "to"):
                r.to(self.accelerator.device)
        self.judge = load_judge(project_path(cfg.judge)) if cfg.judge else None
        if self.judge is not None:  # a prompt the judge cannot read is an error now, not mid-run
            from bench import world

            for p in self.eval_prompts:
                try:
                    world.parse_caption(p)
                except ValueError as e:
                    raise BenchError(f"eval prompt set {cfg.eval_prompts!r}: {e}; with a judge, eval prompts "
                                     "must be tiny-world captions (set judge=null otherwise)") from None
        lc = cfg.lora
        trainable = add_lora(self.pipe.unet, lc.rank, lc.alpha, lc.targets, lc.init, seed=cfg.seed)
        self.ctx = Context(cfg=cfg, pipe=self.pipe, reward=self.reward, train_prompts=self.train_prompts,
                           generator=torch.Generator().manual_seed(cfg.seed), costs=Costs(),
                           accelerator=self.accelerator, trainable=trainable)
        self.method = self.module.Method(self.ctx)
        self.rows: list[dict] = []
        self.step = 0
        self.wall_offset = 0.0
        self.first_eval: dict | None = None
        self.eval_samples: list[dict] = []  # per eval image: step, prompt, seed, reward and held-out metrics
        from bench.trackers import Trackers  # checks the trackers' packages now, starts them on the first row

        self.trackers = Trackers(cfg.get("trackers") or [], run_dir, config=dict(cfg))

    # ---- files ------------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.run_dir, *parts)

    def write_manifest(self, **fields) -> None:
        manifest = {}
        if os.path.isfile(self.path("manifest.json")):
            with open(self.path("manifest.json")) as f:
                manifest = json.load(f)
        manifest.update(fields)
        store.atomic_write_json(self.path("manifest.json"), manifest)

    def write_tables(self) -> None:
        import pandas as pd

        from bench.plots import plot_run

        df = pd.DataFrame(self.rows)
        first = [c for c in COLUMN_ORDER if c in df]
        df = df[first + [c for c in df.columns if c not in first]]
        store.write_table(df, self.path("metrics"))
        if self.eval_samples:
            store.write_table(pd.DataFrame(self.eval_samples), self.path("eval_samples"))
        plot_run(df, self.path("reward_curve.png"), title=f"{self.cfg.method} on {self.cfg.reward}")

    def checkpoint(self) -> None:
        from bench.lora import lora_state_dict

        state = {"step": self.step, "lora": lora_state_dict(self.pipe.unet), "method": self.method.state_dict(),
                 "generator": self.ctx.generator.get_state(), "costs": self.ctx.costs.state_dict(),
                 "rows": self.rows, "wall": self.wall(), "first_eval": self.first_eval,
                 "eval_samples": self.eval_samples}
        store.atomic_write_with(self.path("checkpoint.pt"), lambda b: torch.save(state, b))
        self.write_tables()

    def load_checkpoint(self) -> None:
        from bench.lora import load_lora_state_dict

        state = torch.load(self.path("checkpoint.pt"), map_location="cpu", weights_only=False)
        load_lora_state_dict(self.pipe.unet, state["lora"])
        self.method.load_state_dict(state["method"])
        self.ctx.generator.set_state(state["generator"])
        self.ctx.costs.load_state_dict(state["costs"])
        self.step, self.rows, self.first_eval = state["step"], state["rows"], state["first_eval"]
        self.eval_samples = state["eval_samples"]
        self.wall_offset = state["wall"]

    # ---- evaluation ------------------------------------------------------------------------------
    def wall(self) -> float:
        return self.wall_offset + (time.time() - self.t0)

    @torch.no_grad()
    def evaluate(self, grid: bool) -> dict:
        from bench.plots import save_grid
        from bench.sampling import initial_noise, sample

        ec = self.cfg.eval
        noise = torch.cat([initial_noise(self.pipe, 1, torch.Generator().manual_seed(s)) for s in range(ec.num_seeds)])
        images, prompts = [], []
        for p in self.eval_prompts:  # one batch per prompt: its seeds
            traj = sample(self.pipe, [p] * ec.num_seeds, noise, ec.num_steps, ec.guidance, eta=0.0)
            images.append(traj.images.float().cpu())
            prompts += [p] * ec.num_seeds
        images = torch.cat(images)
        on_device = images.to(self.accelerator.device)
        r = self.reward(on_device, prompts).float().cpu().numpy()
        out = {"eval_reward_mean": float(r.mean()), "eval_reward_std": float(r.std(ddof=1)),
               "eval_reward_sem": float(r.std(ddof=1) / math.sqrt(len(r)))}
        for name, s in getattr(self.reward, "last_terms", {}).items():
            out[f"eval_reward/{name}"] = float(s.float().mean())
        per_image = {"reward": r}
        for spec, metric in self.heldout.items():
            m = metric(on_device, prompts).float().cpu().numpy()
            out[f"eval_{spec}_mean"] = float(m.mean())
            out[f"eval_{spec}_sem"] = float(m.std(ddof=1) / math.sqrt(len(m)))
            per_image[spec] = m
        self.eval_samples += [{"step": self.step, "prompt": p, "seed": i % ec.num_seeds,
                               **{k: float(v[i]) for k, v in per_image.items()}} for i, p in enumerate(prompts)]
        if self.judge is not None:
            fid = self.judge.fidelity(images, prompts)
            out["fidelity"] = float(fid["all"].mean())
            out.update({f"fidelity_{k}": float(v.mean()) for k, v in fid.items() if k != "all"})
        if ec.kl_seeds:
            from bench.sampling import kl_to_base

            kl_noise = noise[: ec.kl_seeds]
            kls = [kl_to_base(self.pipe, [p] * len(kl_noise), kl_noise, self.cfg.sampler.num_steps,
                              self.cfg.sampler.guidance, 1.0, torch.Generator().manual_seed(4242))
                   for p in self.eval_prompts]
            out["kl_to_base"] = float(torch.cat(kls).mean())
        if grid:
            save_grid(images, prompts, ec.num_seeds, self.path("grids", f"step_{self.step:06d}.png"),
                      title=f"{self.cfg.method} / {self.cfg.reward} / step {self.step}")
        return out

    def record(self, metrics: dict, eval_metrics: dict | None) -> None:
        c = self.ctx.costs
        row = {"step": self.step, **metrics, **self.ctx.pop_reward_terms(), **(eval_metrics or {}), "images": c.images,
               "reward_queries": c.reward_queries, "unet_fwd": c.unet_fwd, "unet_bwd": c.unet_bwd,
               "wall_time": self.wall(), "peak_mem_mb": peak_memory_mb(self.device)}
        self.rows.append(row)
        self.trackers.log(row, self.step)

    # ---- the loop --------------------------------------------------------------------------------
    def train(self, resumed: bool = False) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        self.t0 = time.time()
        if not resumed:
            self.first_eval = self.evaluate(grid=True)
            self.record({}, self.first_eval)
            self.checkpoint()
        crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.method}", unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=1.0)
        while self.step < cfg.steps:
            self.step += 1
            with self.accelerator.autocast():
                metrics = self.method.step()
            last = self.step == cfg.steps
            ev = None
            if self.step % cfg.eval.every == 0 or last:
                ev = self.evaluate(grid=self.step % cfg.eval.grid_every == 0 or last)
            self.record(metrics, ev)
            bar.update(1)
            bar.set_postfix({"reward": f"{metrics.get('reward_mean', float('nan')):.4f}"}, refresh=False)
            if self.step % cfg.checkpoint_every == 0 or last:
                self.checkpoint()
            if crash_after and self.step == crash_after:
                os._exit(137)
        bar.close()
        return self.finish()

    def finish(self) -> dict:
        from bench.lora import save_lora
        from bench.plots import save_before_after

        cfg = self.cfg
        save_lora(self.pipe.unet, self.path("lora"), {
            "rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": cfg.lora.targets, "base_model": cfg.model,
            "method": cfg.method, "variant": cfg.variant, "step": self.step})
        first, last = self.first_eval, self.rows[-1]
        save_before_after(self.path("grids", "step_000000.png"), self.path("grids", f"step_{self.step:06d}.png"),
                          self.path("grids", "start_vs_end.png"))
        se = math.hypot(first["eval_reward_sem"], last["eval_reward_sem"])
        # the same eval prompts and seeds before and after: the paired SE is the SE of the mean per-image gain
        before = [e["reward"] for e in self.eval_samples if e["step"] == 0]
        after = [e["reward"] for e in self.eval_samples if e["step"] == self.step]
        gain = np.asarray(after) - np.asarray(before) if len(before) == len(after) > 1 else np.zeros(2)
        paired_se = float(gain.std(ddof=1) / math.sqrt(len(gain)))
        summary = {
            "eval_reward_before": first["eval_reward_mean"], "eval_reward_after": last["eval_reward_mean"],
            "eval_reward_gain_in_se": (last["eval_reward_mean"] - first["eval_reward_mean"]) / se if se > 0 else 0.0,
            "eval_reward_gain_in_paired_se": float(gain.mean()) / paired_se if paired_se > 0 else 0.0,
            "fidelity_before": first.get("fidelity"), "fidelity_after": last.get("fidelity"),
            "steps": self.step, "wall_time_s": last["wall_time"], "peak_mem_mb": last["peak_mem_mb"],
            **{f"{spec}_{when}": row.get(f"eval_{spec}_mean") for spec in self.heldout
               for when, row in (("before", first), ("after", last))},
        }
        store.atomic_write_json(self.path("summary.json"), summary)
        self.trackers.close()
        self.write_manifest(status="complete", end_time=_now())
        return summary


def new_run_dir(cfg: Config, root: str | None = None) -> str:
    root = root or os.path.join(store.RESULTS_ROOT, "runs")
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.method}-{cfg.reward}-seed{cfg.seed}-{stamp}" + (f"-{cfg.tag}" if cfg.tag else "")
    name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    path, i = os.path.join(root, name), 1
    while os.path.exists(path):
        i += 1
        path = os.path.join(root, f"{name}-{i}")
    return path


def start(cfg: Config, run_dir: str | None = None) -> tuple[str, dict]:
    """A new run: everything is loaded and checked before the run folder is created."""
    from methods import get_method

    cfg = Config({**cfg, "variant": get_method(cfg.method).variant(cfg),
                  "method_key": get_method(cfg.method).NAME_KEY})
    run_dir = run_dir or new_run_dir(cfg)
    if os.path.exists(os.path.join(run_dir, "manifest.json")):
        raise BenchError(f"run folder {run_dir!r} already holds a run; accepted: a new folder, or "
                         f"'bench run --resume {run_dir}' to continue it")
    run = Run(cfg, run_dir)
    os.makedirs(run_dir, exist_ok=True)
    store.atomic_write_text(os.path.join(run_dir, "config.yaml"), dump(cfg))
    run.write_manifest(status="running", start_time=_now(), seed=cfg.seed, device=run.device,
                       device_name=_device_name(run.device), torch_threads=torch.get_num_threads(),
                       git=_git_commit(), versions=_versions(), method=cfg.method, variant=cfg.variant,
                       reward=cfg.reward, argv=sys.argv, host=platform.node())
    return run_dir, run.train()


def resume(run_dir: str) -> tuple[str, dict]:
    import yaml

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(cfg_path):
        raise BenchError(f"cannot resume {run_dir!r}: no config.yaml there; accepted: a run folder under results/")
    with open(cfg_path) as f:
        cfg = Config(yaml.safe_load(f))
    run = Run(cfg, run_dir)
    with open(os.path.join(run_dir, "manifest.json")) as f:
        manifest = json.load(f)
    if manifest.get("status") == "complete":
        with open(os.path.join(run_dir, "summary.json")) as f:
            return run_dir, json.load(f)
    resumed = os.path.isfile(os.path.join(run_dir, "checkpoint.pt"))
    if resumed:
        run.load_checkpoint()
    run.write_manifest(resumes=manifest.get("resumes", []) + [{"time": _now(), "from_step": run.step}])
    return run_dir, run.train(resumed=resumed)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()
