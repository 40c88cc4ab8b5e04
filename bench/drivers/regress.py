"""CI regression of reward curves: ``python -m bench regress [--methods ...] [--update]``.

``results/baselines/<method>.json`` holds a reference curve for a SHORT tiny-world run of that method, and
``results/baselines/<method>@<model>.json`` one on another embedded world (``models/<model>``: the tiny flow world,
``alignprop@tiny-flow``; its overrides hold ``model=models/<model>``)
(a few optimizer steps; the config is stored in the file, as overrides of the method's preset), recorded
over several seeds, with a tolerance band derived from the seed spread.

The band rule, at every evaluated step of every checked curve::

    half-width = max(K * std over seeds, abs floor, REL_FLOOR * |mean|)       band = mean -/+ half-width

with K = 3, REL_FLOOR = 0.02; the abs floor is 1e-3, and for judge fidelity one eval image flipping
(1 / eval images) so a single borderline judgement never fails CI.  At step 0 (the base model) every
seed agrees, so there the band is the floor: a change to the sampler or the eval shows at once.
``kl_to_base`` is positive and spreads multiplicatively over seeds (a factor of 4 between seeds is common),
so where every seed's value is positive its band is taken on the logarithm::

    band = exp(mean(log v) -/+ max(K * std(log v), LOG_FLOOR))

A linear band of 3 standard deviations would reach below zero there and could not see a method that
stopped moving (DDPO with its advantages zeroed: KL 0).

Checked curves: ``eval_reward_mean``, ``fidelity``, ``kl_to_base``, every held-out ``eval_<m>_mean`` and every
Frechet distance ``fd_nfe<N>`` that the baseline has.  Besides the bands, every column that was finite at a step in
every baseline seed must be finite there in the rerun ("became NaN").

``bench regress`` reruns each baselined method's short config (``--seeds``, default the first baseline
seed, so a rerun on the machine that recorded it reproduces that seed's curve exactly), prints one line per
curve that leaves its band, e.g. ``alignprop: eval_reward_mean at step 4 = 0.12 below band [0.15, 0.30]``,
draws ``<out>/<method>.png`` (band, baseline mean, rerun) and exits 1 if any curve failed.
``bench regress --update [--methods ...] [--seeds 0 1 2]`` records the baselines anew (a deliberate act:
commit the JSON files it writes).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import pandas as pd

from bench.core import run
from bench.core.config import resolve, short_overrides
from bench.outputs.plots import pyplot
from diffalign import store
from diffalign.errors import BenchError
from diffalign.store import RunFolder
from methods import METHODS
from prompts import load_prompts

BASELINES = os.path.join(store.RESULTS_ROOT, "baselines")
REGRESS_OUT = os.path.join(store.RESULTS_ROOT, "regress")
K, REL_FLOOR, ABS_FLOOR = 3.0, 0.02, 1e-3
UPDATE_SEEDS = [0, 1, 2]
CURVES = ("eval_reward_mean", "fidelity", "kl_to_base")
LOG_CURVES = ("kl_to_base",)  # positive, multiplicative spread: banded on log values
LOG_FLOOR = math.log(1.5)

RULE = {"k": K, "rel_floor": REL_FLOOR, "abs_floor": ABS_FLOOR, "log_floor": LOG_FLOOR, "log_curves": list(LOG_CURVES),
        "text": "band = mean -/+ max(k * std over seeds, floor, rel_floor * |mean|); for log_curves where every "
                "seed is positive: exp(mean(log) -/+ max(k * std(log), log_floor))"}


def band(per_seed: np.ndarray, floor: float, log: bool = False) -> tuple[np.ndarray, ...]:
    """mean, std, lower, upper over seeds (rows) at each step (columns), by the rule in the docstring;
    ``log``: on log values at the steps where every seed is positive."""
    mean = per_seed.mean(0)
    std = per_seed.std(0, ddof=1) if len(per_seed) > 1 else np.zeros_like(mean)
    half = np.maximum.reduce([K * std, np.full_like(mean, floor), REL_FLOOR * np.abs(mean)])
    lower, upper = mean - half, mean + half
    positive = (per_seed > 0).all(0)
    if log and positive.any():
        logs = np.log(per_seed[:, positive])
        log_std = logs.std(0, ddof=1) if len(per_seed) > 1 else np.zeros(logs.shape[1])
        log_half = np.maximum(K * log_std, LOG_FLOOR)
        lower[positive] = np.exp(logs.mean(0) - log_half)
        upper[positive] = np.exp(logs.mean(0) + log_half)
    return mean, std, lower, upper


def _floor(metric: str, cfg: dict) -> float:
    if metric == "fidelity":
        n = len(load_prompts(cfg["eval_prompts"])) * cfg["eval"]["num_seeds"]
        return 1.01 / n
    return ABS_FLOOR


def _run(method: str, overrides: list[str], seed: int, root: str) -> pd.DataFrame:
    cfg = resolve(method, overrides + [f"seed={seed}"])
    run_dir, _ = run.start(cfg, os.path.join(root, f"{method}-seed{seed}"))
    return RunFolder(run_dir).read_metrics()


def _finite_steps(df: pd.DataFrame) -> dict[str, set]:
    out = {}
    for col in df.columns:
        if col != "step" and pd.api.types.is_numeric_dtype(df[col]):
            vals = df[col].to_numpy(dtype=float)
            out[col] = {int(s) for s, v in zip(df["step"], vals) if math.isfinite(v)}
    return out


def parse_name(name: str) -> tuple[str, list[str]]:
    """A baseline's name -> (method, the overrides its world adds): ``ddpo`` -> (ddpo, []), ``ddpo@tiny-flow`` ->
    (ddpo, [model=models/tiny-flow])."""
    method, _, model = name.partition("@")
    if method not in METHODS:
        raise BenchError(f"baseline name {name!r}: unknown method {method!r}; accepted: <method> or <method>@<model> "
                         f"with a method of {', '.join(sorted(METHODS))}")
    if not model:
        return method, []
    folder = os.path.join("models", model)
    if not os.path.isfile(os.path.join(store.PROJECT_ROOT, folder, "model_index.json")):
        raise BenchError(f"baseline name {name!r}: no embedded model {folder!r}; accepted: <method>@<a folder of "
                         "models/ holding a diffusers model>")
    return method, [f"model={folder}"]


def record(method: str, seeds: list[int], extra: list[str] | None = None, workdir: str | None = None) -> dict:
    """Run the short config on every seed and build the baseline (curves, bands, finite columns).  ``method`` may be
    a baseline name ``<method>@<model>`` (``parse_name``)."""
    name = method
    method, world = parse_name(name)
    overrides = short_overrides(method, world + list(extra or []))
    cfg = resolve(method, overrides)
    tmp = workdir or tempfile.mkdtemp(prefix=f"regress-{method}-")
    t0 = time.time()
    try:
        frames = [_run(method, overrides, s, tmp) for s in seeds]
    finally:
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    seconds = (time.time() - t0) / len(seeds)
    curves = {}
    for m in [c for c in CURVES if c in frames[0]] + sorted(
            c for c in frames[0] if (c.startswith("eval_") and c.endswith("_mean") and c not in CURVES and "/" not in c)
            or c.startswith("fd_nfe")):
        steps = sorted(set.intersection(*(set(f.loc[f[m].notna(), "step"]) for f in frames)))
        if not steps:
            continue
        per_seed = np.array([[f.set_index("step").loc[s, m] for s in steps] for f in frames], dtype=float)
        mean, std, lower, upper = band(per_seed, _floor(m, cfg), log=m in LOG_CURVES)
        curves[m] = {"step": steps, "per_seed": per_seed.tolist(), "mean": mean.tolist(), "std": std.tolist(),
                     "lower": lower.tolist(), "upper": upper.tolist()}
    finite = [_finite_steps(f) for f in frames]
    always = {c: sorted(set.intersection(*(fs.get(c, set()) for fs in finite))) for c in finite[0]}
    return {"method": method, "name": name, "overrides": overrides, "seeds": list(seeds), "variant": cfg["variant"],
            "rule": RULE,
            "curves": curves, "finite": {c: s for c, s in always.items() if s},
            "seconds_per_run": round(seconds, 1), "threads": cfg["threads"],
            "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git": run.git_commit()}


def check(baseline: dict, frames: list[pd.DataFrame]) -> list[str]:
    """One line per curve (or column) of the rerun that leaves the baseline; empty when all is well."""
    method = baseline.get("name", baseline["method"])
    problems = []
    rerun = pd.concat(frames).groupby("step").mean(numeric_only=True)  # the mean over rerun seeds
    for col, steps in baseline.get("finite", {}).items():
        bad = [s for s in steps for f in frames
               if col not in f or s not in set(f["step"]) or not math.isfinite(float(f.set_index("step").loc[s, col]))]
        if bad:
            problems.append(f"{method}: {col} became NaN (or went missing) at step {bad[0]}")
    for m, c in baseline["curves"].items():
        out = []
        for s, lo, hi in zip(c["step"], c["lower"], c["upper"]):
            v = float(rerun.loc[s, m]) if m in rerun and s in rerun.index else math.nan
            if not math.isfinite(v):
                out.append(f"{method}: {m} at step {s} is NaN, band [{lo:.4g}, {hi:.4g}]")
            elif v < lo:
                out.append(f"{method}: {m} at step {s} = {v:.4g} below band [{lo:.4g}, {hi:.4g}]")
            elif v > hi:
                out.append(f"{method}: {m} at step {s} = {v:.4g} above band [{lo:.4g}, {hi:.4g}]")
        if out:
            problems.append(out[0] + (f" (and {len(out) - 1} more steps)" if len(out) > 1 else ""))
    return problems


def plot(baseline: dict, frames: list[pd.DataFrame], problems: list[str], path: str) -> None:
    plt = pyplot()
    names = sorted(baseline["curves"], key=lambda m: (m != "eval_reward_mean", m))
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.6), squeeze=False)
    for ax, m in zip(axes[0], names):
        c = baseline["curves"][m]
        ax.fill_between(c["step"], c["lower"], c["upper"], color="tab:gray", alpha=0.3, label="band")
        ax.plot(c["step"], c["mean"], color="tab:gray", ls="--", label="baseline mean")
        failed = any(p.split(": ", 1)[1].startswith(m + " ") for p in problems)
        for i, f in enumerate(frames):
            if m in f:
                ev = f[f[m].notna()]
                ax.plot(ev["step"], ev[m], marker="o", ms=3, color="tab:red" if failed else "tab:green",
                        label="rerun" if i == 0 else None)
        ax.set_title(m + (" (FAILED)" if failed else ""), fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=6)
    fig.suptitle(f"bench regress: {baseline.get('name', baseline['method'])} ({baseline['variant']})", fontsize=9)
    fig.tight_layout()
    store.save_figure(fig, path, dpi=110)
    plt.close(fig)


def baseline_path(directory: str, method: str) -> str:
    return os.path.join(directory, f"{method}.json")


def available(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    return sorted(f[:-5] for f in os.listdir(directory) if f.endswith(".json"))


def regress(methods: list[str] | None, baselines: str = BASELINES, out: str = REGRESS_OUT,
            seeds: list[int] | None = None, log=print) -> list[str]:
    """Rerun every baselined method (or ``methods``); returns the problem lines (empty = pass)."""
    have = available(baselines)
    if methods:
        missing = [m for m in methods if m not in have]
        if missing:
            raise BenchError(f"no baseline for {', '.join(missing)} under {baselines}; accepted: "
                             f"{', '.join(have) or 'none yet'} (record one with 'bench regress --update --methods "
                             f"{' '.join(missing)}')")
    todo = methods or have
    if not todo:
        log(f"regress: no baselines under {baselines}; nothing to check (record them with 'bench regress --update')")
        return []
    unbaselined = sorted(set(METHODS) - set(have))
    if unbaselined and not methods:
        log(f"regress: no baseline yet for {', '.join(unbaselined)} (not checked)")
    problems = []
    for method in todo:  # a baseline's name: <method> or <method>@<model>
        base = read_baseline(baseline_path(baselines, method))
        run_seeds = seeds if seeds is not None else base["seeds"][:1]
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix=f"regress-{method}-") as tmp:
            frames = [_run(base["method"], base["overrides"], s, tmp) for s in run_seeds]
        found = check(base, frames)
        plot(base, frames, found, os.path.join(out, f"{method}.png"))
        verdict = "FAILED" if found else "ok"
        log(f"regress: {method} {verdict} ({len(run_seeds)} seed(s), {time.time() - t0:.0f} s; "
            f"plot {os.path.join(out, method + '.png')})")
        for line in found:
            log(line)
        problems += found
    return problems


def read_baseline(path: str) -> dict:
    """A baseline file, or one error line naming it when it is damaged."""
    try:
        with open(path) as f:
            base = json.load(f)
        missing = [k for k in ("method", "overrides", "seeds", "curves") if not isinstance(base, dict) or k not in base]
        if missing:
            raise ValueError(f"lacks {', '.join(missing)}")
        return base
    except (ValueError, UnicodeDecodeError) as e:
        raise BenchError(f"baseline {path!r} is damaged ({e}); accepted: a file written by 'bench regress --update' "
                         "(record it anew)") from None


def update(methods: list[str] | None, baselines: str = BASELINES, seeds: list[int] | None = None,
           extra: list[str] | None = None, log=print) -> list[str]:
    """Record the baselines of ``methods`` (default: every registered method) anew."""
    written = []
    for method in methods or sorted(METHODS):
        t0 = time.time()
        base = record(method, seeds or UPDATE_SEEDS, extra)
        path = baseline_path(baselines, method)
        store.atomic_write_json(path, base)
        written.append(path)
        log(f"regress --update: {method}: {len(base['seeds'])} seeds in {time.time() - t0:.0f} s -> {path}")
    return written


def main(args) -> int:
    if args.update:
        update(args.methods, args.baselines, args.seeds, args.overrides)
        return 0
    if args.overrides:
        raise BenchError("--set only applies with --update (a baseline's config is stored in it); "
                         "accepted: bench regress --update --set KEY=VALUE")
    problems = regress(args.methods, args.baselines, args.out, args.seeds)
    if problems:
        print(f"regress: {len(problems)} curve(s) left their band", file=sys.stderr)
        return 1
    return 0
