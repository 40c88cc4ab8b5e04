"""Curves of several runs: ``python -m bench compare RUNS... [--method M] [--metric M] --x X --out-dir DIR``.

Runs come from the store: give run folders, or folders that hold run folders (``results/runs``, a sweep
folder), and narrow them with ``--method``, ``--reward`` and ``--tag``.  Runs are grouped by method (by
method and variant when one method appears with several variants, and by reward when several rewards are
selected); a group's line is the mean over its seeds, its shaded band +/- one standard error.

The x-axis is any cost papers use, because they disagree: ``step``, ``images`` (samples generated),
``reward_queries``, ``unet_passes`` (forward + backward UNet passes, in images), ``unet_fwd``, ``unet_bwd``
or ``wall_time``.  Seeds are aligned by optimizer step (every seed evaluates at the same steps) and the
x value of a point is the seeds' mean at that step (identical across seeds for the counters).

``--out-dir`` writes one figure per metric, PNG and SVG, at paper column width (3.3 in); ``--out FILE``
keeps the older form: every metric as a panel of one figure.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import pandas as pd

from bench.outputs.plots import pyplot, read_grid_cells, side_by_side_image
from diffalign.errors import BenchError
from diffalign.store import RESULTS_ROOT, RunFolder, atomic_write_with, damaged, safe_name, save_figure
from prompts import load_prompts

X_AXES = ("step", "images", "reward_queries", "unet_passes", "unet_fwd", "unet_bwd", "wall_time")
X_LABELS = {"step": "optimizer step", "images": "images generated", "reward_queries": "reward queries",
            "unet_passes": "UNet passes (fwd + bwd)", "unet_fwd": "UNet forward passes",
            "unet_bwd": "UNet backward passes", "wall_time": "wall-clock time (s)"}
Y_LABELS = {"eval_reward_mean": "eval reward (held-out prompts)", "win_rate": "win rate against the base model",
            "fidelity": "prompt fidelity (judge)",
            "kl_to_base": "KL to base model (nats)"}
COLUMN_WIDTH_IN = 3.3  # one column of a two-column paper


@dataclasses.dataclass
class RunData:
    """One run as the comparison tools see it: its folder, config, metrics, manifest and summary."""

    path: str
    cfg: dict
    df: pd.DataFrame
    manifest: dict
    summary: dict | None

    @property
    def method(self) -> str:
        return self.cfg["method"]

    @property
    def reward(self) -> str:
        return str(self.cfg.get("reward"))

    @property
    def seed(self) -> int:
        return int(self.cfg.get("seed", 0))

    @property
    def complete(self) -> bool:
        return self.manifest.get("status") == "complete"

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.path)

    @classmethod
    def read(cls, path: str) -> "RunData":
        folder = RunFolder(path)
        if not folder.is_run():
            raise BenchError(f"{path!r} is not a run folder (no config.yaml / metrics.parquet); "
                             "accepted: folders written by 'bench run'")
        df = folder.read_metrics()
        if "unet_fwd" in df and "unet_bwd" in df:
            df["unet_passes"] = df["unet_fwd"] + df["unet_bwd"]
        samples = folder.file(RunFolder.EVAL_SAMPLES + ".parquet")
        if "win_rate" not in df and os.path.isfile(samples):
            try:
                df = with_win_rate(df, pd.read_parquet(samples))
            except Exception as e:  # pyarrow's errors of a damaged file
                raise damaged(samples, e, "an eval-samples table written by 'bench run'") from None
        return cls(path, folder.read_config(), df, folder.read_manifest(), folder.read_summary())


def with_win_rate(df: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """A run written before the harness logged ``win_rate``: the same figure from its per-image eval scores (the
    fraction of eval images scored above the base model's image of the same prompt and seed, ties counting half)."""
    base = samples[samples["step"] == 0].set_index(["prompt", "seed"])["reward"]
    if not base.index.is_unique or not len(base):  # repeated eval prompts: no way to match images
        return df
    rates = {}
    for step, part in samples.groupby("step"):
        gain = part.set_index(["prompt", "seed"])["reward"] - base.reindex(part.set_index(["prompt", "seed"]).index)
        if gain.notna().all() and len(gain):
            rates[int(step)] = float(((gain > 0) + 0.5 * (gain == 0)).mean())
    df = df.copy()
    df["win_rate"] = df["step"].map(rates) if rates else np.nan
    return df


def find_run_dirs(paths: list[str]) -> list[str]:
    """Run folders among ``paths``: each path is a run folder or a folder holding run folders (two levels)."""
    found: list[str] = []
    for p in paths:
        if RunFolder(p).is_run():
            found.append(p)
            continue
        if not os.path.isdir(p):
            raise BenchError(f"{p!r} is not a run folder (no config.yaml / metrics.parquet); accepted: folders "
                             "written by 'bench run', or folders holding them (results/runs, a sweep folder)")
        inner = []
        for name in sorted(os.listdir(p)):
            sub = os.path.join(p, name)
            if name.startswith("."):
                continue
            if RunFolder(sub).is_run():
                inner.append(sub)
            elif os.path.isdir(sub):
                inner += [os.path.join(sub, n) for n in sorted(os.listdir(sub))
                          if RunFolder(os.path.join(sub, n)).is_run()]
        if not inner:
            raise BenchError(f"{p!r} is not a run folder and holds none; accepted: folders written by 'bench run', "
                             "or folders holding them (results/runs, a sweep folder)")
        found += inner
    return list(dict.fromkeys(os.path.normpath(f) for f in found))


def select_runs(paths: list[str], methods: list[str] | None = None, rewards: list[str] | None = None,
                tags: list[str] | None = None, complete_only: bool = True) -> list[RunData]:
    """The runs under ``paths`` that match every filter given (a filter left out matches all)."""
    runs, where = [], paths or [os.path.join(RESULTS_ROOT, "runs")]
    for d in find_run_dirs(where):
        try:
            runs.append(RunData.read(d))
        except BenchError as e:  # a damaged file: this run is left out, with one line saying which and why
            print(f"skipped run {d!r}: {e}", file=sys.stderr)
    if not runs:
        raise BenchError(f"no readable run under {where} (see the lines above); accepted: folders written by "
                         "'bench run'")
    kept = [r for r in runs
            if (not methods or r.method in methods) and (not rewards or r.reward in rewards)
            and (not tags or str(r.cfg.get("tag", "")) in tags) and (r.complete or not complete_only)]
    if not kept:
        have = sorted({f"{r.method}/{r.reward}" + ("" if r.complete else " (incomplete)") for r in runs})
        raise BenchError(f"no {'complete ' if complete_only else ''}run matches method={methods or 'any'}, "
                         f"reward={rewards or 'any'}, tag={tags or 'any'}; accepted (method/reward found): "
                         f"{', '.join(have) or 'none'}")
    return sorted(kept, key=lambda r: (r.reward, r.method, str(r.cfg.get("variant", "")), r.seed, r.path))


def group_label(run: RunData, runs: list[RunData]) -> str:
    """The method's name; with its variant when the selection holds several variants of that method."""
    variants = {str(r.cfg.get("variant", "")) for r in runs if r.method == run.method}
    return f"{run.method} [{run.cfg.get('variant', '')}]" if len(variants) > 1 else run.method


def groups(runs: list[RunData]) -> dict[tuple[str, str], list[RunData]]:
    """(reward, label) -> the runs (seeds) of that group, in a stable order."""
    out: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        out.setdefault((r.reward, group_label(r, runs)), []).append(r)
    return out


def mean_curve(runs: list[RunData], metric: str, x: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """x, mean and standard error over seeds of ``metric`` at the steps where every seed has it."""
    cols = list(dict.fromkeys(["step", x, metric]))
    frames = [r.df[cols].dropna().drop_duplicates("step", keep="last") for r in runs if metric in r.df and x in r.df]
    frames = [f.assign(_x=f[x]).set_index("step") for f in frames if len(f)]
    if not frames:
        return np.array([]), np.array([]), np.array([]), 0
    steps = sorted(set.intersection(*(set(f.index) for f in frames)))
    xs = np.array([f.loc[steps, "_x"].to_numpy() for f in frames], dtype=float)
    ys = np.array([f.loc[steps, metric].to_numpy() for f in frames], dtype=float)
    se = ys.std(0, ddof=1) / np.sqrt(len(frames)) if len(frames) > 1 else np.zeros(len(steps))
    return xs.mean(0), ys.mean(0), se, len(frames)


PAPER_STYLE = {"font.size": 7, "axes.labelsize": 7, "axes.titlesize": 7, "legend.fontsize": 6,
               "xtick.labelsize": 6, "ytick.labelsize": 6, "lines.linewidth": 1.2, "lines.markersize": 2.5,
               "axes.spines.top": False, "axes.spines.right": False, "svg.fonttype": "none"}


def _check_axes(runs: list[RunData], metrics: list[str], x: str) -> None:
    if x not in X_AXES:
        raise BenchError(f"x-axis {x!r}; accepted: {', '.join(X_AXES)}")
    for m in metrics:
        if not any(m in r.df for r in runs):
            raise BenchError(f"metric {m!r} is in none of the runs; accepted: "
                             f"{', '.join(sorted(set().union(*(r.df.columns for r in runs))))}")


def plot_curves(runs: list[RunData], metrics: list[str], x: str, out_dir: str, title: str = "") -> list[str]:
    """One figure per (reward, metric): a line per method (mean over seeds, +/- 1 SE band); PNG and SVG.

    Returns the written paths.  File names: ``<reward>__<metric>__<x>.png|svg`` (reward left out when
    the selection holds one reward)."""
    _check_axes(runs, metrics, x)
    plt = pyplot()
    by_group = groups(runs)
    rewards = sorted({rw for rw, _ in by_group})
    written = []
    for reward in rewards:
        for m in metrics:
            with plt.rc_context(PAPER_STYLE):
                fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.3))
                drawn = 0
                for (rw, label), members in by_group.items():
                    if rw != reward:
                        continue
                    xs, mean, se, n = mean_curve(members, m, x)
                    if not n:
                        continue
                    line, = ax.plot(xs, mean, marker="o", label=f"{label} (n={n})")
                    if n > 1:
                        ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.2, lw=0)
                    drawn += 1
                if not drawn:  # no run of this reward has the metric
                    plt.close(fig)
                    continue
                ax.set_xlabel(X_LABELS[x])
                ax.set_ylabel(Y_LABELS.get(m, m))
                ax.set_title(title or (f"{m} on {reward}" if len(rewards) > 1 else m))
                ax.grid(alpha=0.3, lw=0.5)
                fig.tight_layout(pad=0.3)
                # the legend under the axes, never over the curves (labels with variants are long)
                ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.22), frameon=False, borderaxespad=0.0)
                stem = "__".join(([safe_name(reward)] if len(rewards) > 1 else []) + [safe_name(m), x])
                for ext in ("png", "svg"):
                    path = os.path.join(out_dir, f"{stem}.{ext}")
                    save_figure(fig, path, dpi=300, bbox_inches="tight", pad_inches=0.03)
                    written.append(path)
                plt.close(fig)
    return written


def plot_metrics(runs: list[RunData], metrics: list[str], x: str, out: str, title: str = "") -> None:
    """The one-file form: every metric as a panel of one figure, a line per method and variant."""
    _check_axes(runs, metrics, x)
    plt = pyplot()
    by_variant: dict[str, list[RunData]] = {}
    for r in runs:
        by_variant.setdefault(f"{r.method}: {r.cfg.get('variant', '')}", []).append(r)
    legend_in = 0.17 * len(by_variant) + 0.2  # the legend goes under the panels: variant names are long
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 2.8 + legend_in), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for label, members in by_variant.items():
            xs, mean, se, n = mean_curve(members, m, x)
            if not n:
                continue
            line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{label} (n={n})")
            if n > 1:
                ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(X_LABELS.get(x, x))
        ax.set_ylabel(Y_LABELS.get(m, m))
        ax.grid(alpha=0.3, lw=0.5)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, frameon=False, ncol=1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, legend_in / (2.8 + legend_in), 1, 1))
    save_figure(fig, out, dpi=120)
    plt.close(fig)


# ---- side-by-side grids ---------------------------------------------------------------------------------

def side_by_side(runs: list[RunData], out: str, step: int | None = None, seed_index: int = 0,
                 max_prompts: int | None = None) -> str:
    """One image: a row per method (its lowest training seed's run) plus the base model (step 0), on the
    same eval prompts and eval seed, at ``step`` (default: each run's final step).

    The cells are cut from the grids the harness saved (``grids/step_NNNNNN.png``), so no model is
    loaded; a step without a saved grid is an error naming the steps that have one."""
    rewards = sorted({r.reward for r in runs})
    if len(rewards) > 1:
        raise BenchError(f"a side-by-side grid shows one reward; the selection holds {', '.join(rewards)}; "
                         "accepted: narrow it with --reward")
    rows: list[tuple[str, list]] = []
    prompts_ref = None
    by_group = groups(runs)
    first = min(runs, key=lambda r: r.seed)
    for (_, label), members in [(("", "base model"), [first])] + list(by_group.items()):
        run = min(members, key=lambda r: r.seed)
        available = run.folder.grid_steps()
        want = 0 if label == "base model" else (step if step is not None else (available[-1] if available else -1))
        if want not in available:
            raise BenchError(f"run {run.path!r} has no grid at step {want}; accepted steps: "
                             f"{', '.join(map(str, available)) or 'none (no grids/ folder)'}")
        cells = read_grid_cells(run.folder.grid_path(want))
        prompts = _eval_prompts(run, len(cells))
        if not 0 <= seed_index < len(cells[0]):
            raise BenchError(f"eval seed index {seed_index}; accepted: 0..{len(cells[0]) - 1}")
        if prompts_ref is None:
            prompts_ref = prompts
        elif prompts != prompts_ref:
            raise BenchError(f"run {run.path!r} was evaluated on other prompts than {first.path!r}; accepted: "
                             "runs that share eval prompts")
        name = label if label == "base model" else f"{label} (step {want})"
        rows.append((name, [c[seed_index] for c in cells][:max_prompts]))
    img = side_by_side_image(rows, prompts_ref[:max_prompts])
    atomic_write_with(out, lambda b: img.save(b, format="PNG"))
    return out


def _eval_prompts(run: RunData, n: int) -> list[str]:
    """The run's eval prompts (their labels), or 'prompt i' when the prompt file is gone."""
    try:
        prompts = load_prompts(run.cfg["eval_prompts"])
    except (BenchError, OSError):
        prompts = []
    return prompts if len(prompts) == n else [f"prompt {i}" for i in range(n)]

