"""``make geneval-bench``: the methods of issue 29 on ``tiny-geneval``, proxy against gold, over seeds.

Each method runs its ``tiny-geneval`` preset (``bench/presets/geneval/<method>.yaml``: the tiny flow world, the
verifiable compositional reward read by the second judge) into ``results/geneval/<method>-seed<k>/``: a finished
run is kept, an interrupted one resumed (``--resume``), so the bench runs in any number of sittings.  Then
``docs/geneval.md`` and the README's table between its ``geneval`` markers are written from the store:

- **proxy**: the eval ``tiny-geneval`` (GenEval's 0/1 rule as the *training* judge, ``models/tiny-geneval-judge``,
  reads it) on the eval prompts, before -> after and its paired gain in SE;
- **gold**: the held-out judge's prompt fidelity (``models/tiny-judge``, never trained on: another seed, another
  architecture) on the same images, before -> after and its paired gain in SE (per image: 1 when its shape,
  colour and count are all read right; the held-out judge has no position head, and the eval prompts name none).

Paired: the same eval prompts and seeds before and after, so the SE is that of the mean per-image change.
"""
from __future__ import annotations

import argparse
import os
import re
import sys

import numpy as np

from bench.tools.flow_world import _load, _mean_se, _metrics, _values, run_or_resume, status
from diffalign.store import PROJECT_ROOT, atomic_write_text

ROOT = os.path.join(PROJECT_ROOT, "results", "geneval")
PRESETS = os.path.join(PROJECT_ROOT, "bench", "presets", "geneval")
DOC = os.path.join(PROJECT_ROOT, "docs", "geneval.md")
README = os.path.join(PROJECT_ROOT, "README.md")
MARKERS = ("<!-- geneval:begin (bench/tools/geneval_bench.py writes this table) -->", "<!-- geneval:end -->")
THRESHOLD_SE = 3.0


def methods() -> list[str]:
    """The methods with a ``tiny-geneval`` preset, in the order the issue names them."""
    order = ["flow-grpo", "flow-grpo-fast", "dance-grpo", "mix-grpo", "diffusion-nft", "alignprop", "ddpo-sf"]
    have = {f[:-5] for f in os.listdir(PRESETS) if f.endswith(".yaml")}
    return [m for m in order if m in have] + sorted(have - set(order))


def run_dir(method: str, seed: int) -> str:
    return os.path.join(ROOT, f"{method}-seed{seed}")


def run_one(method: str, seed: int, extra: list[str]) -> int:
    fresh = ["--method", method, "--preset", os.path.join(PRESETS, f"{method}.yaml"), "--seed", str(seed), *extra]
    return run_or_resume(run_dir(method, seed), fresh, "geneval-bench", f"{method} seed {seed}")


def _fmt(v, spec: str = "+.1f") -> str:
    return "" if v is None else format(v, spec)


def runs_table(names: list[str], seeds: list[int]) -> str:
    rows = ["| method | seed | proxy: tiny-geneval before -> after | proxy gain (paired SE) | "
            "gold: held-out fidelity before -> after | gold gain (paired SE) | train batches' reward (first half -> "
            "second half) | zero-spread groups | KL to base | wall (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in names:
        for seed in seeds:
            got = _load(run_dir(m, seed))
            if got is None:
                if seed == seeds[0]:
                    rows.append(f"| {m} | {seed} | not run ({status(run_dir(m, seed))}) | | | | | | | |")
                continue
            s, _ = got
            df = _metrics(run_dir(m, seed))  # read once: the KL, the batches' reward and the zero-spread fraction
            kl = (_values(df, "kl_to_base") or [None])[-1]
            batch = _values(df, "reward_mean")
            half = len(batch) // 2
            trend = f"{np.mean(batch[:half]):.3f} -> {np.mean(batch[half:]):.3f}" if half else ""
            zero = _values(df, "zero_spread_frac")
            rows.append(f"| {m} | {seed} | {s['eval_reward_before']:.3f} -> {s['eval_reward_after']:.3f} | "
                        f"{_fmt(s.get('eval_reward_gain_in_paired_se'))} | "
                        f"{s['fidelity_before']:.3f} -> {s['fidelity_after']:.3f} | "
                        f"{_fmt(s.get('fidelity_gain_in_paired_se'))} | {trend} | "
                        f"{_fmt(np.mean(zero) if zero else None, '.2f')} | {_fmt(kl, '.3g')} | "
                        f"{s['wall_time_s']:.0f} |")
    return "\n".join(rows) + "\n"


def trials_table(sub: str = "trials") -> str:
    """The runs kept under ``results/geneval/<sub>/``, one row each: ``trials`` (settings tried before the presets),
    ``alone`` (a preset's ``make bench`` timed alone on the machine)."""
    folder = os.path.join(ROOT, sub)
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    rows = ["| run | variant | steps | proxy before -> after | proxy (paired SE) | gold before -> after | "
            "gold (paired SE) | wall (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in names:
        got = _load(os.path.join(folder, name))
        if got is None:
            continue
        s, _ = got
        with open(os.path.join(folder, name, "config.yaml")) as f:
            variant = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("variant:")), "?")
        rows.append(f"| {name} | `{variant}` | {s.get('steps', '')} | "
                    f"{s['eval_reward_before']:.3f} -> {s['eval_reward_after']:.3f} | "
                    f"{_fmt(s.get('eval_reward_gain_in_paired_se'))} | "
                    f"{s['fidelity_before']:.3f} -> {s['fidelity_after']:.3f} | "
                    f"{_fmt(s.get('fidelity_gain_in_paired_se'))} | {s['wall_time_s']:.0f} |")
    return "\n".join(rows) + "\n" if len(rows) > 2 else ""


def seeds_table(names: list[str], seeds: list[int]) -> str:
    """Mean ± SE over the seeds that finished, per method: proxy and gold side by side."""
    rows = ["| method | seeds | proxy after | proxy gain (paired SE) | gold after | gold gain (paired SE) | "
            f"seeds with gold > {THRESHOLD_SE:g} SE | wall (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    base = None
    for m in names:
        ss = [g[0] for g in (_load(run_dir(m, s)) for s in seeds) if g is not None]
        if not ss:
            continue
        base = base or ss[0]
        rows.append(f"| {m} | {len(ss)} | {_mean_se([s['eval_reward_after'] for s in ss])} | "
                    f"{_mean_se([s.get('eval_reward_gain_in_paired_se') for s in ss])} | "
                    f"{_mean_se([s['fidelity_after'] for s in ss])} | "
                    f"{_mean_se([s.get('fidelity_gain_in_paired_se') for s in ss])} | "
                    f"{sum((s.get('fidelity_gain_in_paired_se') or 0) > THRESHOLD_SE for s in ss)} of {len(ss)} | "
                    f"{_mean_se([s['wall_time_s'] for s in ss])} |")
    if base is None:
        return ""
    rows.insert(2, f"| base model | | {base['eval_reward_before']:.3f} | | {base['fidelity_before']:.3f} | | | |")
    return "\n".join(rows) + "\n"


def ceiling(names: list[str], seeds: list[int]) -> str:
    """The largest paired gold gain the eval set allows: every image the base model fails fixed, none broken."""
    import pandas as pd  # lazy: only the tables need it

    for m in names:
        for seed in seeds:
            path = os.path.join(run_dir(m, seed), "eval_samples.parquet")
            if not os.path.isfile(path):
                continue
            base = pd.read_parquet(path)
            gold = base.loc[base["step"] == 0, "fidelity"].dropna().to_numpy(dtype=float) if "fidelity" in base else []
            if len(gold) < 2:
                continue
            gain = 1.0 - gold  # the per-image change when every failure is fixed and nothing else moves
            se = gain.std(ddof=1) / np.sqrt(len(gain))
            best = gain.mean() / se if se > 0 else float("inf")
            return (f"The base model fails the held-out judge on {int(gain.sum())} of {len(gain)} eval images "
                    f"(gold {gold.mean():.3f}); fixing every one and breaking none would be a paired gold gain of "
                    f"+{best:.1f} SE, so a {THRESHOLD_SE:g}-SE gain needs most of them fixed with few new failures.\n")
    return ""


def write(names: list[str], seeds: list[int]) -> None:
    over = seeds_table(names, seeds)
    head = ("# `tiny-geneval`: GRPO, DiffusionNFT, AlignProp and DDPO-SF, proxy against gold\n\n"
            "[README](../README.md) · [all pages](index.md) · [rewards](rewards.md#tiny-geneval) · "
            "[GRPO](methods/grpo.md) · [DiffusionNFT](methods/diffusion_nft.md)\n\n"
            "Written by `make geneval-bench` (`bench/tools/geneval_bench.py`) from `results/geneval/`: each method's "
            "`tiny-geneval` preset (`bench/presets/geneval/<method>.yaml`, `make bench METHOD=<m> PRESET=geneval`) "
            "on the tiny flow world. **Proxy**: the reward trained on, GenEval's 0/1 rule read by the second judge. "
            "**Gold**: the held-out judge's prompt fidelity on the same eval images (8 eval prompts x the preset's "
            "eval seeds), never trained on. Gains are paired (the same prompts and seeds before and after), in "
            "standard errors of the mean per-image change. Wall times are each run's own, on the machine as it "
            "was (see the closing notes of the session that ran them).\n\n")
    body = ""
    if over:
        body += "## Over seeds (mean ± SE over seeds)\n\n" + over + "\n" + ceiling(names, seeds) + "\n"
    body += "## Every run\n\n" + runs_table(names, seeds)
    alone = trials_table("alone")
    if alone:
        body += ("\n## Alone on the machine\n\n`make bench METHOD=<m> PRESET=geneval ARGS=\"--out ...\"` with nothing "
                 "else running (2 torch threads, seed 0; the step-0 evaluation computed, not cached), kept in "
                 "`results/geneval/alone/`. The runs above shared the 2 cores two at a time, 1 thread each.\n\n"
                 + alone)
    trials = trials_table()
    if trials:
        body += ("\n## Trials\n\nSeed 0 each, the settings in the variant string (32 eval seeds, evaluated every 8 "
                 "or 16 steps; the curve in each run's `reward_curve.png`), kept in `results/geneval/trials/`. The two "
                 "16-step trials ran before the presets, beside the test suite and each other, so their wall times "
                 "are of a loaded machine; a setting equal to a preset's gives that preset's seed-0 numbers (the "
                 "extra evaluations draw from their own generators). `flow-grpo-preset-48-steps` is the flow-grpo "
                 "preset at three times its budget, alone on the machine.\n\n" + trials)
    atomic_write_text(DOC, head + body)
    print(f"wrote {DOC}")
    if over:
        with open(README) as f:
            text = f.read()
        pat = re.compile(re.escape(MARKERS[0]) + ".*?" + re.escape(MARKERS[1]), re.S)
        if pat.search(text):
            atomic_write_text(README, pat.sub(lambda _: MARKERS[0] + "\n" + over + MARKERS[1], text))
            print(f"wrote the table in {README}")


def main(argv: list[str] | None = None) -> int:
    have = methods()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=have, help=f"default: every method with a preset ({have})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--table", action="store_true", help="only write docs/geneval.md and the README table")
    p.add_argument("--set", dest="extra", nargs="+", default=[], help="more overrides for every new run")
    a = p.parse_args(argv)
    bad = [m for m in a.methods if m not in have]
    if bad:
        print(f"geneval-bench: no tiny-geneval preset for {', '.join(bad)}; accepted: {', '.join(have)}",
              file=sys.stderr)
        return 2
    failed = []
    if not a.table:
        extra = [x for kv in a.extra for x in ("--set", kv)]
        failed = [f"{m} seed {s}" for s in a.seeds for m in a.methods if run_one(m, s, extra) != 0]
    write(have, sorted({0, 1, 2, *a.seeds}))
    if failed:
        print(f"geneval-bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
