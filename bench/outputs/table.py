"""Paper tables: ``python -m bench table RUNS... --out STEM [--threshold T]`` -> STEM.md, STEM.tex, STEM.csv.

One row per method x reward (x eval prompt set), each cell a mean +/- standard error over the row's
seeds (complete runs only):

- the final eval reward and every held-out metric in the runs (judge fidelity, ``kl_to_base``,
  ``eval_<metric>_mean`` of ``eval.metrics``), read at the final step;
- images, reward queries and wall time to reach ``--threshold`` in eval reward: the first evaluation at
  or above it, per seed; seeds that never reach it are left out of the mean and counted, e.g. ``(2/3)``.
  The default threshold, per reward, is halfway from the base model's eval reward (step 0) to the best
  row's final eval reward; the caption states the value used;
- peak memory (MB) and UNet passes (forward + backward, in images) per optimizer step;
- where the runs have them, the Frechet distance at each NFE (``fd_nfe<N>``, lower is better), and a second table
  ``STEM_fd.md``: the base model's FD (step 0) above each group's final FD, per NFE.

The best entry of a column within one reward is bold (higher is better for rewards and fidelity, lower
for costs; ``kl_to_base`` says how far a method moved, which is neither, so it is never bold).
Method, reward and prompt names are escaped for LaTeX (& % $ # _ { } ~ ^ \\).  The CSV holds the plain
numbers (mean, se, n per column) for other tools.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import pandas as pd

from bench.outputs.compare import RunData, group_label
from bench.outputs.fd_tables import FD_COLUMN, sweep_markdown
from diffalign import store
from diffalign.errors import BenchError

LATEX_SPECIALS = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "\\": r"\textbackslash{}"}
HIGHER, LOWER, NEITHER = 1, -1, 0


def latex_escape(text: str) -> str:
    """Every LaTeX special character escaped, in one pass (so a produced backslash is never escaped again)."""
    return re.sub(r"[&%$#_{}~^\\]", lambda m: LATEX_SPECIALS[m.group()], str(text))


def _final(df: pd.DataFrame, col: str) -> float:
    vals = df[col].dropna() if col in df else pd.Series(dtype=float)
    return float(vals.iloc[-1]) if len(vals) else math.nan


def _mean_se(values: list[float]) -> tuple[float, float, int]:
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan, 0
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan, len(v)


def heldout_metrics(runs: list[RunData]) -> list[str]:
    cols = set().union(*(r.df.columns for r in runs))
    extra = sorted(c for c in cols if c.startswith("eval_") and c.endswith("_mean") and c != "eval_reward_mean"
                   and "/" not in c)
    fd = sorted((c for c in cols if FD_COLUMN.match(c)), key=lambda c: int(FD_COLUMN.match(c).group(1)))
    return [c for c in ("win_rate", "fidelity", "kl_to_base") if c in cols] + extra + fd


def time_to(df: pd.DataFrame, threshold: float) -> dict[str, float]:
    """Images, reward queries and wall time at the first evaluation with eval reward >= threshold."""
    ev = df[df["eval_reward_mean"].notna()]
    if math.isnan(threshold):
        return {"images": math.nan, "reward_queries": math.nan, "wall_time": math.nan}
    hit = ev[ev["eval_reward_mean"] >= threshold]
    if not len(hit):
        return {"images": math.nan, "reward_queries": math.nan, "wall_time": math.nan}
    row = hit.iloc[0]
    return {k: float(row[k]) if k in row else math.nan for k in ("images", "reward_queries", "wall_time")}


def build(runs: list[RunData], threshold: float | None = None) -> tuple[pd.DataFrame, dict, dict[str, float]]:
    """The table as numbers: one row per group, columns ``<col>`` (mean), ``<col>_se``, ``<col>_n``.

    Returns (table, column directions, threshold per reward)."""
    runs = [r for r in runs if r.complete]
    if not runs:
        raise BenchError("no complete run to tabulate; accepted: run folders whose manifest says complete")
    heldout = heldout_metrics(runs)
    keys: dict[tuple, list[RunData]] = {}
    for r in runs:
        keys.setdefault((r.reward, group_label(r, runs), str(r.cfg.get("eval_prompts", ""))), []).append(r)
    thresholds: dict[str, float] = {}
    for reward in sorted({k[0] for k in keys}):
        if threshold is not None:
            thresholds[reward] = float(threshold)
            continue
        base = np.nanmean([r.df["eval_reward_mean"].dropna().iloc[0] for r in runs if r.reward == reward])
        best = max(np.nanmean([_final(r.df, "eval_reward_mean") for r in members])
                   for k, members in keys.items() if k[0] == reward)
        thresholds[reward] = float(base + 0.5 * (best - base)) if best > base else math.nan
    rows = []
    directions = {"eval_reward_mean": HIGHER}
    for (reward, label, prompts), members in keys.items():
        row: dict = {"method": label, "reward": reward, "eval_prompts": prompts, "seeds": len(members)}
        cols: dict[str, list[float]] = {"eval_reward_mean": [_final(r.df, "eval_reward_mean") for r in members]}
        for m in heldout:
            cols[m] = [_final(r.df, m) for r in members]
            directions[m] = NEITHER if m == "kl_to_base" else LOWER if FD_COLUMN.match(m) else HIGHER
        reached = [time_to(r.df, thresholds[reward]) for r in members]
        for k in ("images", "reward_queries", "wall_time"):
            cols[f"{k}_to_threshold"] = [t[k] for t in reached]
            directions[f"{k}_to_threshold"] = LOWER
        cols["peak_mem_mb"] = [float(r.df["peak_mem_mb"].max()) if "peak_mem_mb" in r.df else math.nan
                               for r in members]
        cols["unet_passes_per_step"] = [
            float((r.df["unet_fwd"].iloc[-1] + r.df["unet_bwd"].iloc[-1]) / max(int(r.df["step"].iloc[-1]), 1))
            for r in members]
        directions["peak_mem_mb"] = directions["unet_passes_per_step"] = LOWER
        for c, vals in cols.items():
            row[c], row[f"{c}_se"], row[f"{c}_n"] = _mean_se(vals)
        rows.append(row)
    return pd.DataFrame(rows), directions, thresholds


HEADERS = {"eval_reward_mean": "eval reward", "win_rate": "win rate vs base", "fidelity": "fidelity",
           "kl_to_base": "KL to base (nats)",
           "images_to_threshold": "images to thr.", "reward_queries_to_threshold": "reward queries to thr.",
           "wall_time_to_threshold": "wall time to thr. (s)", "peak_mem_mb": "peak mem. (MB)",
           "unet_passes_per_step": "UNet passes / step"}


def _header(col: str) -> str:
    if col in HEADERS:
        return HEADERS[col]
    if FD_COLUMN.match(col):
        return f"FD at NFE {FD_COLUMN.match(col).group(1)}"
    return col[len("eval_"):-len("_mean")] + " (held-out)" if col.startswith("eval_") else col


def _fmt(x: float) -> str:
    if math.isnan(x):
        return "-"
    a = abs(x)
    if a >= 1000:
        return f"{x:,.0f}"
    if a >= 100:
        return f"{x:.0f}"
    if a >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def _best(table: pd.DataFrame, col: str, direction: int) -> set[int]:
    """Row indices holding the best value of ``col`` within each reward."""
    if direction == NEITHER:
        return set()
    best = set()
    for _, part in table.groupby("reward"):
        vals = part[col].dropna()
        if len(part) < 2 or not len(vals):  # one method alone is not "best"
            continue
        target = vals.max() if direction == HIGHER else vals.min()
        best |= set(vals.index[vals == target])
    return best


def cells(table: pd.DataFrame, directions: dict, latex: bool) -> tuple[list[str], list[list[str]]]:
    value_cols = [c for c in directions if c in table]
    headers = ["method", "reward", "eval prompts", "seeds"] + [_header(c) for c in value_cols]
    pm = r" $\pm$ " if latex else " ± "
    out = []
    best = {c: _best(table, c, directions[c]) for c in value_cols}
    for i, row in table.iterrows():
        line = [row["method"], row["reward"], row["eval_prompts"], str(row["seeds"])]
        if latex:
            line = [latex_escape(x) for x in line]
        for c in value_cols:
            text = _fmt(row[c])
            if not math.isnan(row[f"{c}_se"]):
                text += pm + _fmt(row[f"{c}_se"])
            if c.endswith("_to_threshold") and row[f"{c}_n"] < row["seeds"] and row[f"{c}_n"] > 0:
                text += f" ({int(row[f'{c}_n'])}/{row['seeds']})"
            if i in best[c]:
                text = rf"\textbf{{{text}}}" if latex else f"**{text}**"
            line.append(text)
        out.append(line)
    return headers, out


def caption(thresholds: dict[str, float]) -> str:
    thr = "; ".join(f"{r}: {v:.4g}" if not math.isnan(v) else f"{r}: none (no gain over the base model)"
                    for r, v in thresholds.items())
    return ("Final eval reward and held-out metrics, mean ± standard error over seeds; cost to reach the eval-reward "
            f"threshold ({thr}); peak memory; UNet passes per optimizer step. Best per reward in bold.")


def to_markdown(table: pd.DataFrame, directions: dict, thresholds: dict) -> str:
    headers, rows = cells(table, directions, latex=False)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n\n" + caption(thresholds) + "\n"


def to_latex(table: pd.DataFrame, directions: dict, thresholds: dict) -> str:
    headers, rows = cells(table, directions, latex=True)
    lines = [r"\begin{table}[t]", r"\centering", r"\small", r"\begin{tabular}{" + "ll" + "l" + "r" * (len(headers) - 3)
             + "}", r"\toprule", " & ".join(latex_escape(h) for h in headers) + r" \\", r"\midrule"]
    previous = None
    for r, reward in zip(rows, table["reward"]):
        if previous is not None and reward != previous:
            lines.append(r"\midrule")
        previous = reward
        lines.append(" & ".join(r) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}",
              r"\caption{" + latex_escape(caption(thresholds)).replace("±", r"$\pm$") + "}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def write(runs: list[RunData], stem: str, threshold: float | None = None) -> list[str]:
    table, directions, thresholds = build(runs, threshold)
    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    store.atomic_write_text(stem + ".md", to_markdown(table, directions, thresholds))
    store.atomic_write_text(stem + ".tex", to_latex(table, directions, thresholds))
    plain = table.copy()
    plain.insert(4, "threshold", [thresholds[r] for r in plain["reward"]])
    store.atomic_write_text(stem + ".csv", plain.to_csv(index=False))
    written = [stem + ".md", stem + ".tex", stem + ".csv"]
    fd = sweep_markdown([r for r in runs if r.complete], group_label)
    if fd:
        store.atomic_write_text(stem + "_fd.md", fd)
        written.append(stem + "_fd.md")
    return written
