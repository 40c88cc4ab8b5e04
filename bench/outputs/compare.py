"""Curves of several runs: ``python -m bench compare RUNS... [--method M] [--metric M] --x X --out-dir DIR``.

Runs come from the store: give run folders, or folders that hold run folders (``results/runs``, a sweep
folder), and narrow them with ``--method``, ``--reward`` and ``--tag``.  Runs are grouped by method (by
method and variant when one method appears with several variants, and by reward when several rewards are
selected); a group's line is the mean over its seeds, its shaded band +/- one standard error.

The x-axis is any cost papers use, because they disagree: ``step``, ``images`` (samples generated),
``reward_queries``, ``unet_passes`` (forward + backward UNet passes, in images), ``unet_fwd``, ``unet_bwd``
or ``wall_time``.  Seeds are aligned by optimizer step (every seed evaluates at the same steps) and the
x value of a point is the seeds' mean at that step (identical across seeds for the counters).

``--out-dir`` writes one figure per metric (and per training reward), PNG and SVG, at paper column width (3.3 in);
``--out FILE`` keeps the older form: every metric as a panel of one figure, a row of panels per training reward.
Runs trained on different rewards are never drawn on one axis: each reward gets its own figure (``--out-dir``) or
row of panels (``--out``), titled with the reward, and ``compare`` says so in one line on stderr.

Every method has its own colour, the same in every figure (``method_style``); the variants of one method differ by
line style and marker.  A group whose x never moves (OGDM generates no images; DDE and Diffusion-DPO draw their
whole pool before their first step) is a vertical line with error bars, and its legend entry gives that x.  Legends
sit under the axes and are inside the saved image (``bbox_inches="tight"``).
"""
from __future__ import annotations

import dataclasses
import os
import re
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
# One colour per method (tab10, in the order of the method registry, then further colours for any other name); the
# variants of a method take its colour with a line style and a marker of their own.
METHOD_ORDER = ("alignprop", "ddpo", "ddpo-sf", "dpok", "rlr", "rlr-code", "diffusion-dpo", "dde", "ogdm")
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#e7ba52", "#637939", "#ad494a", "#7b4173", "#3182bd")
LINESTYLES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)))
MARKERS = ("o", "s", "^", "D", "v", "P", "X")


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


def method_style(method: str, variant_index: int = 0, others: tuple[str, ...] = ()) -> dict:
    """Line colour, style and marker of a method's ``variant_index``-th variant: the colour is the method's own
    (the same in every figure), the style and marker the variant's.  ``others``: the methods of the selection, so a
    method outside ``METHOD_ORDER`` gets a colour no listed method has."""
    if method in METHOD_ORDER:
        colour = PALETTE[METHOD_ORDER.index(method)]
    else:
        extra = sorted({m for m in others if m not in METHOD_ORDER} | {method})
        colour = PALETTE[(len(METHOD_ORDER) + extra.index(method)) % len(PALETTE)]
    return {"color": colour, "linestyle": LINESTYLES[variant_index % len(LINESTYLES)],
            "marker": MARKERS[variant_index % len(MARKERS)]}


def _styles(labels: list[tuple[str, str]]) -> dict[str, dict]:
    """(method, label) pairs -> each label's ``method_style`` (variants numbered within their method, in order)."""
    methods = tuple(dict.fromkeys(m for m, _ in labels))
    seen: dict[str, list[str]] = {}
    out = {}
    for method, label in labels:
        variants = seen.setdefault(method, [])
        if label not in variants:
            variants.append(label)
        out[label] = method_style(method, variants.index(label), methods)
    return out


def legend_label(label: str, width: int = 44) -> str:
    """A long group label (method [variant]) broken onto lines at its '/' so the legend stays narrow."""
    if len(label) <= width:
        return label
    lines, line = [], ""
    for part in re.split(r"(?<=/)", label):
        if line and len(line) + len(part) > width:
            lines.append(line)
            line = "   " + part
        else:
            line += part
    return "\n".join(lines + [line])


def warn_mixed_rewards(runs: list[RunData]) -> list[str]:
    """The selection's training rewards; with several, one line on stderr: each gets its own panel or figure."""
    rewards = sorted({r.reward for r in runs})
    if len(rewards) > 1:
        sys.stderr.write(f"warning: these runs were trained on {len(rewards)} rewards ({', '.join(rewards)}); each "
                         "reward gets its own panels, never one axis (narrow with --reward)\n")
        sys.stderr.flush()
    return rewards


def _draw_groups(ax, members_by_label: dict[str, list[RunData]], metric: str, x: str, styles: dict,
                 ms=None) -> list[str]:
    """A line per group (mean over seeds, +/- 1 SE band) on ``ax``.  A group whose x never moves (OGDM generates no
    images; the preference methods draw their whole pool before their first step) is drawn as it is, a vertical
    line with error bars, and its legend entry says so.  Returns the legend labels drawn, in the groups' order."""
    drawn = []
    for label, members in members_by_label.items():
        xs, mean, se, n = mean_curve(members, metric, x)
        if not n:
            continue
        style = dict(styles[label], **({"ms": ms} if ms else {}))
        if x != "step" and len(xs) > 1 and float(np.nanmax(xs)) == float(np.nanmin(xs)):
            text = legend_label(f"{label} (n={n}; {X_LABELS.get(x, x)}: {xs[0]:g} at every step)")
            ax.errorbar(xs, mean, yerr=se if n > 1 else None, capsize=2, elinewidth=0.6, label=text, **style)
        else:
            text = legend_label(f"{label} (n={n})")
            line, = ax.plot(xs, mean, label=text, **style)
            if n > 1:
                ax.fill_between(xs, mean - se, mean + se, color=line.get_color(), alpha=0.15, lw=0)
        drawn.append(text)
    return drawn


def _handles(axes, order: list[str]) -> tuple[list, list[str]]:
    """The legend handles of ``axes`` for the labels ``order`` (each once, in that order)."""
    found = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            found.setdefault(label, h)
    labels = [label for label in dict.fromkeys(order) if label in found]
    return [found[label] for label in labels], labels


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
    """One figure per (training reward, metric): a line per method (mean over seeds, +/- 1 SE band); PNG and SVG.

    Returns the written paths.  File names: ``<reward>__<metric>__<x>.png|svg`` (reward left out when
    the selection holds one reward); every title names the reward."""
    _check_axes(runs, metrics, x)
    plt = pyplot()
    by_group = groups(runs)
    rewards = sorted({rw for rw, _ in by_group})
    styles = _styles([(members[0].method, label) for (_, label), members in by_group.items()])
    written = []
    for reward in rewards:
        mine = {label: members for (rw, label), members in by_group.items() if rw == reward}
        for m in metrics:
            with plt.rc_context(PAPER_STYLE):
                fig, ax = plt.subplots(figsize=(COLUMN_WIDTH_IN, 2.3))
                drawn = _draw_groups(ax, mine, m, x, styles)
                if not drawn:  # no run of this reward has the metric
                    plt.close(fig)
                    continue
                ax.set_xlabel(X_LABELS[x])
                ax.set_ylabel(Y_LABELS.get(m, m))
                ax.set_title(f"{title}: {m}, trained on {reward}" if title else f"{m}, trained on {reward}")
                ax.grid(alpha=0.3, lw=0.5)
                fig.tight_layout(pad=0.3)
                # the legend under the axes, never over the curves; bbox_inches="tight" keeps it in the image
                ax.legend(*_handles([ax], drawn), loc="upper left", bbox_to_anchor=(0.0, -0.22), frameon=False,
                          borderaxespad=0.0)
                stem = "__".join(([safe_name(reward)] if len(rewards) > 1 else []) + [safe_name(m), x])
                for ext in ("png", "svg"):
                    path = os.path.join(out_dir, f"{stem}.{ext}")
                    save_figure(fig, path, dpi=300, bbox_inches="tight", pad_inches=0.03)
                    written.append(path)
                plt.close(fig)
    return written


def plot_metrics(runs: list[RunData], metrics: list[str], x: str, out: str, title: str = "") -> None:
    """The one-file form: every metric a panel, a row of panels per training reward (titled with it), a line per
    method and variant; one legend under the panels, inside the saved image."""
    _check_axes(runs, metrics, x)
    plt = pyplot()
    rewards = sorted({r.reward for r in runs})
    by_variant: dict[tuple[str, str], list[RunData]] = {}
    for r in runs:
        by_variant.setdefault((r.reward, f"{r.method}: {r.cfg.get('variant', '')}"), []).append(r)
    styles = _styles([(members[0].method, label) for (_, label), members in by_variant.items()])
    fig, axes = plt.subplots(len(rewards), len(metrics), figsize=(3.6 * len(metrics), 2.8 * len(rewards)),
                             squeeze=False)
    order = []
    for row, reward in zip(axes, rewards):
        mine = {label: members for (rw, label), members in by_variant.items() if rw == reward}
        for ax, m in zip(row, metrics):
            drawn = _draw_groups(ax, mine, m, x, styles, ms=3)
            order += drawn
            if not drawn:
                ax.text(0.5, 0.5, f"no run trained on {reward} has {m}", transform=ax.transAxes, ha="center",
                        fontsize=7, color="0.4")
            ax.set_xlabel(X_LABELS.get(x, x))
            ax.set_ylabel(Y_LABELS.get(m, m))
            ax.set_title(f"trained on {reward}", fontsize=8)
            ax.grid(alpha=0.3, lw=0.5)
    handles, labels = _handles(axes.flat, order)  # every group of every panel, once
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0),
               fontsize=7, frameon=False, ncol=1 if len(labels) < 6 or len(metrics) < 2 else 2)
    save_figure(fig, out, dpi=120, bbox_inches="tight", pad_inches=0.05)
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

