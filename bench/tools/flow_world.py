"""``make flow-bench``: every registered method's preset on the tiny flow world, one run each, resumable, and the table.

Each method runs as ``bench run --method <m> --model models/tiny-flow`` would (its preset, 2 threads), into
``results/flow-world/<method>-seed<s>``, one process per run (so a run's time and memory are its own).  ``--world ddpm``
runs the same preset on the DDPM world (no ``--model``: what ``make bench METHOD=<m>`` runs) into
``results/flow-world/ddpm/<method>-seed<s>``, for the side-by-side table.  A complete run is kept, an interrupted one is
resumed (``--resume``), so the job can be stopped and rerun in pieces.  ``--table`` (also after the runs) writes
``docs/flow_world.md`` from the store:

1. per flow run: the eval reward before and after with the gain in standard errors (unpaired and paired), prompt
   fidelity, the held-out rating, KL to the base model and the run's wall time;
2. every method with runs of several seeds on both worlds: the mean and standard error over seeds of those numbers;
3. for each method whose seed-0 flow run gained less than 3 (unpaired) SE, what the store measured about why: the
   paired gain, its training batches' reward from first to last step, its KL to the base model and gradient norm
   beside the same preset on the DDPM world, and the step at which its eval curve, extended as a straight line
   through its evaluations, would reach 3 SE (an extrapolation, labelled as one).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

from diffalign.store import PROJECT_ROOT, atomic_write_text
from methods import METHODS

ROOT = os.path.join(PROJECT_ROOT, "results", "flow-world")
MODEL = "models/tiny-flow"
DOC = os.path.join(PROJECT_ROOT, "docs", "flow_world.md")
WORLDS = ("flow", "ddpm")
THRESHOLD_SE = 3.0


def run_dir(method: str, seed: int, world: str = "flow") -> str:
    return os.path.join(ROOT, f"{method}-seed{seed}") if world == "flow" else os.path.join(ROOT, world,
                                                                                            f"{method}-seed{seed}")


def status(path: str) -> str:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f).get("status", "unknown")
    except (OSError, ValueError):
        return "absent"


def run_or_resume(path: str, fresh: list[str], label: str, what: str) -> int:
    """``bench run`` into ``path``: kept when complete, resumed when started, else run with ``fresh`` (the
    arguments after ``bench run`` but ``--out``); ``label`` prefixes the lines printed, ``what`` names the run."""
    state = status(path)
    if state == "complete":
        print(f"{label}: {what} complete, kept")
        return 0
    cmd = [sys.executable, "-m", "bench", "run"]
    cmd += ["--resume", path] if state != "absent" else [*fresh, "--out", path]
    print(f"{label}:", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, cwd=PROJECT_ROOT)


def run_one(method: str, seed: int, extra: list[str], world: str = "flow") -> int:
    model = ["--model", MODEL] if world == "flow" else []
    return run_or_resume(run_dir(method, seed, world), ["--method", method, *model, "--seed", str(seed), *extra],
                         "flow-bench", f"{method} seed {seed} ({world})")


def _load(path: str) -> tuple[dict, str] | None:
    """A finished run's summary and training reward spec, or None."""
    try:
        with open(os.path.join(path, "summary.json")) as f:
            s = json.load(f)
        with open(os.path.join(path, "config.yaml")) as f:
            reward = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("reward:")), "?")
    except OSError:
        return None
    return s, reward


def _metrics(path: str):
    import pandas as pd  # lazy: only the tables need it

    try:
        return pd.read_parquet(os.path.join(path, "metrics.parquet"))
    except OSError:
        return None


def _values(df, column: str) -> list[float]:
    """A metrics table's logged values of ``column`` (none when the table or the column is missing)."""
    return [float(v) for v in df[column].dropna()] if df is not None and column in df else []


def _column(path: str, column: str) -> list[float]:
    return _values(_metrics(path), column)


def _last(path: str, column: str) -> str:
    vals = _column(path, column)
    return f"{vals[-1]:.3g}" if vals else ""


def table(methods: list[str], seeds: list[int]) -> str:
    rows = ["| method | seed | eval reward before -> after | gain (SE) | paired (SE) | fidelity | tiny-rating | "
            "KL to base | wall (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in methods:
        for seed in seeds:
            path = run_dir(method, seed)
            got = _load(path)
            if got is None:
                if seed == seeds[0]:
                    rows.append(f"| {method} | {seed} | not run ({status(path)}) | | | | | | |")
                continue
            s, reward = got
            kl = _last(path, "kl_to_base")
            fid = f"{s['fidelity_before']:.2f} -> {s['fidelity_after']:.2f}" if s.get("fidelity_before") is not None \
                else ""
            rating = f"{s['tiny-rating_before']:.2f} -> {s['tiny-rating_after']:.2f}" \
                if s.get("tiny-rating_before") is not None else ""
            before_after = f"{s['eval_reward_before']:.4f} -> {s['eval_reward_after']:.4f}"
            rows.append(f"| {method} ({reward}) | {seed} | {before_after} | "
                        f"{s['eval_reward_gain_in_se']:+.1f} | {s.get('eval_reward_gain_in_paired_se', 0):+.1f} | "
                        f"{fid} | {rating} | {kl} | {s['wall_time_s']:.0f} |")
    return "\n".join(rows) + "\n"


def _mean_se(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if not len(v):
        return ""
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    digits = 3 if np.max(np.abs(v)) < 100 else 0
    return f"{v.mean():.{digits}f} ± {se:.{digits}f}" if np.isfinite(se) else f"{v.mean():.{digits}f}"


def seeds_table(methods: list[str], seeds: list[int]) -> str:
    """Mean ± SE over seeds, the same preset on both worlds, for the methods with at least two seeds on each."""
    rows = ["| method (reward) | world | seeds | eval reward gain | gain (SE) | paired gain (SE) | fidelity after | "
            "KL to base | wall (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    shown = 0
    for method in methods:
        per_world = {w: [(run_dir(method, s, w), _load(run_dir(method, s, w))) for s in seeds] for w in WORLDS}
        per_world = {w: [(p, g) for p, g in runs if g is not None] for w, runs in per_world.items()}
        if min(len(r) for r in per_world.values()) < 2:
            continue
        shown += 1
        for w in WORLDS:
            runs = per_world[w]
            ss = [g[0] for _, g in runs]
            kls = [(_column(p, "kl_to_base") or [float("nan")])[-1] for p, _ in runs]
            rows.append(f"| {method} ({runs[0][1][1]}) | {w} | {len(runs)} | "
                        f"{_mean_se([s['eval_reward_after'] - s['eval_reward_before'] for s in ss])} | "
                        f"{_mean_se([s['eval_reward_gain_in_se'] for s in ss])} | "
                        f"{_mean_se([s.get('eval_reward_gain_in_paired_se') for s in ss])} | "
                        f"{_mean_se([s.get('fidelity_after') for s in ss])} | {_mean_se(kls)} | "
                        f"{_mean_se([s['wall_time_s'] for s in ss])} |")
    return "\n".join(rows) + "\n" if shown else ""


def _batch_change(path: str) -> tuple[float, float, float] | None:
    """The training batches' mean reward at the first and last step and the change in units of their SE."""
    df = _metrics(path)
    if df is None or "reward_mean" not in df:
        return None
    d = df.dropna(subset=["reward_mean", "reward_std", "images"])
    if len(d) < 2:
        return None
    n = max(float(d["images"].iloc[0]), 1.0)
    se = float(np.hypot(d["reward_std"].iloc[0], d["reward_std"].iloc[-1])) / np.sqrt(n)
    a, b = float(d["reward_mean"].iloc[0]), float(d["reward_mean"].iloc[-1])
    return a, b, (b - a) / se if se > 0 else float("nan")


def crossing(path: str) -> tuple[float, float] | None:
    """(the step, the seconds) at which the straight line through a run's evaluations (least squares, eval reward
    against step) reaches 3 unpaired SE of the final evaluation above the step-0 value; None when it does not rise.
    An extrapolation: curves bend, so it is a lower bound on the budget only if the curve does not flatten."""
    df = _metrics(path)
    got = _load(path)
    if df is None or got is None or "eval_reward_mean" not in df:
        return None
    e = df.dropna(subset=["eval_reward_mean"])
    if len(e) < 2:
        return None
    slope = float(np.polyfit(e["step"].astype(float), e["eval_reward_mean"].astype(float), 1)[0])
    se = float(np.hypot(e["eval_reward_sem"].iloc[0], e["eval_reward_sem"].iloc[-1]))
    if not slope > 0 or not se > 0:
        return None
    steps = THRESHOLD_SE * se / slope
    s = got[0]
    per_step = s.get("train_time_s", s["wall_time_s"]) / max(s["steps"], 1)
    return steps, steps * per_step + s.get("eval_time_s", 0.0)


def why(methods: list[str]) -> str:
    """One measured paragraph per method whose seed-0 flow run gained less than 3 unpaired SE."""
    out = []
    for method in methods:
        got = _load(run_dir(method, 0))
        if got is None or got[0]["eval_reward_gain_in_se"] > THRESHOLD_SE:
            continue
        s, reward = got
        path, ddpm = run_dir(method, 0), run_dir(method, 0, "ddpm")
        parts = [f"paired gain {s.get('eval_reward_gain_in_paired_se', 0):+.1f} SE"
                 f" (unpaired {s['eval_reward_gain_in_se']:+.1f}) in {s['wall_time_s']:.0f} s"]
        nfes = sorted(int(k[6:-6]) for k in s if k.startswith("fd_nfe") and k.endswith("_after"))
        if nfes:
            parts.append("its own objective is the data distribution, not the reward: FD " + ", ".join(
                f"NFE {n} {s[f'fd_nfe{n}_before']:.2f} -> {s[f'fd_nfe{n}_after']:.2f}" for n in nfes))
        b = _batch_change(path)
        if b:
            trend = "rose" if b[2] > 2 else "fell" if b[2] < -2 else "stayed flat"
            parts.append(f"its training batches' reward {trend} ({b[0]:.3g} -> {b[1]:.3g}, {b[2]:+.1f} batch SE)")
        kl, kl_d = _last(path, "kl_to_base"), _last(ddpm, "kl_to_base")
        if kl:
            parts.append(f"KL to base {kl}" + (f" (DDPM world, same preset: {kl_d})" if kl_d else ""))
        g, g_d = _column(path, "grad_norm"), _column(ddpm, "grad_norm")
        if g and g_d:
            parts.append(f"median grad norm {np.median(g):.3g} (DDPM world {np.median(g_d):.3g})")
        c = crossing(path)
        if c:
            parts.append(f"its eval curve, extended as a line, would reach 3 SE at step {c[0]:.0f} (~{c[1]:.0f} s; "
                         "extrapolated)")
        else:
            parts.append("its eval curve, fitted as a line, does not rise")
        out.append(f"- **{method}** ({reward}): " + "; ".join(parts) + ".")
    return "\n".join(out) + "\n" if out else ""


def write_doc(methods: list[str], seeds: list[int]) -> None:
    head = ("# The tiny flow world: every method's preset\n\n[README](../README.md) · [all pages](index.md) · "
            "[the flow world](flow.md)\n\nWritten by `make flow-bench` (`bench/tools/flow_world.py`) from "
            "`results/flow-world/`: each method's committed preset, unchanged, on `models/tiny-flow` (2 threads; "
            "eval at the flow world's 10 Euler steps). Gains are in standard errors of the eval reward over 8 eval "
            "prompts x 8 seeds, unpaired and paired. Wall times are each run's own, on the machine as it was: the "
            "seed-1 and seed-2 flow runs of 2026-12-07 shared 2 cores with up to three other jobs.\n\n")
    body = table(methods, seeds)
    both = seeds_table(methods, seeds)
    if both:
        body += ("\n## The same preset on both worlds, over seeds\n\nMean ± standard error over seeds; the DDPM "
                 "runs are `make bench METHOD=<m>` (no model given) into `results/flow-world/ddpm/` "
                 "(`python -m bench.tools.flow_world --world ddpm --methods ... --seeds 0 1 2`).\n\n" + both)
    reasons = why(methods)
    if reasons:
        body += ("\n## Under 3 SE on the flow world: what the store measured\n\nFor each method whose seed-0 run "
                 "gained less than 3 unpaired SE, from its own run folders (the DDPM figures from the same preset "
                 "where that run exists).\n\n" + reasons)
    atomic_write_text(DOC, head + body)
    print(f"wrote {DOC}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="default: every registered method")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--world", choices=WORLDS, default="flow", help="which world the runs are on (default: flow)")
    p.add_argument("--table", action="store_true", help="only write docs/flow_world.md from the store (of --methods)")
    p.add_argument("--set", dest="extra", nargs="+", default=[], help="more overrides for every run")
    a = p.parse_args(argv)
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        print(f"flow-bench: unknown method(s) {', '.join(bad)}; accepted: {', '.join(METHODS)}", file=sys.stderr)
        return 2
    failed = []
    if not a.table:
        extra = [x for kv in a.extra for x in ("--set", kv)]
        failed = [m for m in a.methods for s in a.seeds if run_one(m, s, extra, a.world) != 0]
    write_doc(list(METHODS), sorted({0, 1, 2, *a.seeds}))
    if failed:
        print(f"flow-bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
