"""Curves of several runs on one figure: ``python -m bench compare RUN_DIR ... --metric M --x X``.

Runs are grouped by their ``variant`` (one line per group: the mean over its runs, a shaded band of
+/- one standard error when a group has several seeds).  The x-axis is any cost column papers use:
``step``, ``images``, ``reward_queries``, ``unet_fwd``, ``unet_bwd`` or ``wall_time``.
"""
from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd
import yaml

from bench import store
from bench.errors import BenchError

X_AXES = ("step", "images", "reward_queries", "unet_fwd", "unet_bwd", "wall_time")


def load_run(run_dir: str) -> tuple[dict, pd.DataFrame]:
    cfg_path, metrics = os.path.join(run_dir, "config.yaml"), os.path.join(run_dir, "metrics.parquet")
    if not (os.path.isfile(cfg_path) and os.path.isfile(metrics)):
        raise BenchError(f"{run_dir!r} is not a run folder (no config.yaml / metrics.parquet); "
                         "accepted: folders written by 'bench run'")
    with open(cfg_path) as f:
        return yaml.safe_load(f), pd.read_parquet(metrics)


def plot_metrics(run_dirs: list[str], metrics: list[str], x: str, out: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if x not in X_AXES:
        raise BenchError(f"x-axis {x!r}; accepted: {', '.join(X_AXES)}")
    runs = [load_run(d) for d in run_dirs]
    for m in metrics:
        if not any(m in df for _, df in runs):
            raise BenchError(f"metric {m!r} is in none of the runs; accepted: "
                             f"{', '.join(sorted(set().union(*(df.columns for _, df in runs))))}")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), squeeze=False)
    groups: dict[str, list[pd.DataFrame]] = {}
    for cfg, df in runs:
        groups.setdefault(f"{cfg['method']}: {cfg.get('variant', '')}", []).append(df)
    for ax, m in zip(axes[0], metrics):
        for label, dfs in groups.items():
            rows = [df[df[m].notna()] if m in df else df.iloc[:0] for df in dfs]
            rows = [r for r in rows if len(r)]
            if not rows:
                continue
            n = min(len(r) for r in rows)
            xs = np.mean([r[x].to_numpy()[:n] for r in rows], axis=0)
            ys = np.array([r[m].to_numpy()[:n] for r in rows], dtype=float)
            mean = ys.mean(0)
            line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={len(rows)})")
            if len(rows) > 1:
                se = ys.std(0, ddof=1) / np.sqrt(len(rows))
                ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(x)
        ax.set_ylabel(m)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    store.save_figure(fig, out, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("runs", nargs="+")
    p.add_argument("--metric", action="append", default=None)
    p.add_argument("--x", default="step")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    plot_metrics(a.runs, a.metric or ["eval_reward_mean"], a.x, a.out, a.title)
    print(f"wrote {a.out}")
