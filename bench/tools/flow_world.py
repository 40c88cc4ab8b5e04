"""``make flow-bench``: every registered method's preset on the tiny flow world, one run each, resumable, and the table.

Each method runs as ``bench run --method <m> --model models/tiny-flow`` would (its preset, seed 0, 2 threads), into
``results/flow-world/<method>-seed<s>``, one process per run (so a run's time and memory are its own).  A complete run
is kept, an interrupted one is resumed (``--resume``), so the job can be stopped and rerun in pieces.  ``--table``
(also after the runs) writes ``docs/flow_world.md`` from the store: per method the eval reward before and after with
the gain in standard errors (unpaired and paired), prompt fidelity, the held-out rating, KL to the base model and
the run's wall time, beside the same method's ``make bench`` figures on the DDPM world where a run folder is given.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from diffalign.store import PROJECT_ROOT, atomic_write_text
from methods import METHODS

ROOT = os.path.join(PROJECT_ROOT, "results", "flow-world")
MODEL = "models/tiny-flow"
DOC = os.path.join(PROJECT_ROOT, "docs", "flow_world.md")


def run_dir(method: str, seed: int) -> str:
    return os.path.join(ROOT, f"{method}-seed{seed}")


def status(path: str) -> str:
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            return json.load(f).get("status", "unknown")
    except (OSError, ValueError):
        return "absent"


def run_one(method: str, seed: int, extra: list[str]) -> int:
    path = run_dir(method, seed)
    state = status(path)
    if state == "complete":
        print(f"flow-bench: {method} seed {seed} complete, kept")
        return 0
    cmd = [sys.executable, "-m", "bench", "run"]
    cmd += ["--resume", path] if state not in ("absent",) else [
        "--method", method, "--model", MODEL, "--seed", str(seed), "--out", path, *extra]
    print("flow-bench:", " ".join(cmd[1:]), flush=True)
    return subprocess.call(cmd, cwd=PROJECT_ROOT)


def table(methods: list[str], seeds: list[int]) -> str:
    rows = ["| method | seed | eval reward before -> after | gain (SE) | paired (SE) | fidelity | tiny-rating | "
            "KL to base | wall (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method in methods:
        for seed in seeds:
            path = run_dir(method, seed)
            try:
                with open(os.path.join(path, "summary.json")) as f:
                    s = json.load(f)
                with open(os.path.join(path, "config.yaml")) as f:
                    reward = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("reward:")), "?")
            except OSError:
                rows.append(f"| {method} | {seed} | not run ({status(path)}) | | | | | | |")
                continue
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


def _last(path: str, column: str) -> str:
    import pandas as pd  # lazy: only the table needs it

    try:
        df = pd.read_parquet(os.path.join(path, "metrics.parquet"))
    except OSError:
        return ""
    vals = df[column].dropna() if column in df else []
    return f"{float(vals.iloc[-1]):.3g}" if len(vals) else ""


def write_doc(methods: list[str], seeds: list[int]) -> None:
    head = ("# The tiny flow world: every method's preset\n\n[README](../README.md) · [all pages](index.md) · "
            "[the flow world](flow.md)\n\nWritten by `make flow-bench` (`bench/tools/flow_world.py`) from "
            "`results/flow-world/`: each method's committed preset, unchanged, on `models/tiny-flow` (seed 0, 2 "
            "threads; eval at the flow world's 10 Euler steps). Gains are in standard errors of the eval reward "
            "over 8 eval prompts x 8 seeds, unpaired and paired.\n\n")
    atomic_write_text(DOC, head + table(methods, seeds))
    print(f"wrote {DOC}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=list(METHODS), help="default: every registered method")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
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
        failed = [m for m in a.methods for s in a.seeds if run_one(m, s, extra) != 0]
    write_doc(a.methods, a.seeds)
    if failed:
        print(f"flow-bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
