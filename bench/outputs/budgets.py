"""Budget curves, sample efficiency and over-optimisation: the numbers a version-2 leaderboard adds to version 1's.

A version-2 protocol (``budgets:`` in ``bench/protocols/tiny-v2.yaml``) evaluates every run at several training
budgets on its way to the largest.  The eval prompts and noise are the same at every evaluation of every run, so any
two evaluations are paired per image, and everything here is a paired difference:

- **gain at a budget**: image i's value at that evaluation minus at step 0 (the base model), over the runs (seeds);
  ``G`` its mean and ``SE(G)^2 = var_s(mean_i g) / S + var_i(mean_s g) / I`` (:func:`paired_se`: the seeds' term,
  dropped with one seed, plus the images' term).  The same between any two budgets (the over-optimisation rule).
- **area under the curve** (:func:`area`): the gain in the reward's own units, averaged over the budget range on a
  log2 axis of the protocol's nominal budgets (trapezoids between the points, divided by the range's width); the
  same x for every method, so it ranks sample efficiency within a reward: a method that gains early scores more
  than one that reaches the same final gain late.
- **crossing, extrapolated** (:func:`crossing`): for a curve that stays under ``sigma`` SE, the budget at which a
  least-squares line of gain-in-SE against log2(images) through its points would reach it; labelled as an
  extrapolation wherever shown, never as a measurement; none when the line does not rise.
- **over-optimisation** (:func:`overoptimisation`), in the manner of Gao, Schulman, Hilton, "Scaling Laws for
  Reward Model Overoptimization" (arXiv 2210.10760), whose gold reward rises and then falls as the policy moves away
  from its start while the proxy keeps rising: on a training reward with a gold counterpart (``gold:`` in the
  protocol: tiny-aesthetic's hidden tiny-rating, tiny-geneval's held-out judge), the curve of both against the KL to
  the base model, and **the flag**: let b* be the evaluation (step 0 included) with the highest mean gold; the flag
  is raised when b* is not the last one, the gold falls from b* to the last by more than ``sigma`` paired SE, and
  the proxy rises from b* to the last (paired gain > 0).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from bench.outputs.leaderboard_page import fmt
from diffalign import store

COST_AXES = (("images", "training images generated"), ("reward_queries", "reward queries"),
             ("unet_passes", "UNet passes (fwd + bwd, in images)"), ("wall_time", "wall time (s)"))


def paired_se(g: np.ndarray) -> float:
    """SE of the mean of per-image gains ``g`` (seeds x images): the seeds' term (dropped with one seed) plus the
    images' term, ``var_s(mean_i g) / S + var_i(mean_s g) / I``."""
    var = g.mean(axis=1).var(ddof=1) / g.shape[0] if g.shape[0] > 1 else 0.0
    return float(math.sqrt(var + g.mean(axis=0).var(ddof=1) / g.shape[1]))


def eval_steps(samples: pd.DataFrame) -> list[int]:
    """A run's evaluations, step 0 first."""
    return sorted(int(s) for s in samples["step"].unique())


def _values(samples: pd.DataFrame, column: str, step: int) -> np.ndarray:
    return samples[samples["step"] == step].sort_values(["prompt", "seed"])[column].to_numpy(float)


def paired(samples: list[pd.DataFrame], column: str, a: int, b: int) -> tuple[float, float]:
    """(G, SE(G)) of ``column`` from the a-th evaluation to the b-th (indices into each run's eval steps, 0 = the
    base model), paired per image over the runs (seeds); NaN where a run lacks the column or the evaluation."""
    gains = []
    for s in samples:
        steps = eval_steps(s)
        if column not in s or max(a, b) >= len(steps):
            return math.nan, math.nan
        x, y = _values(s, column, steps[a]), _values(s, column, steps[b])
        if len(x) != len(y) or not len(x):
            return math.nan, math.nan
        gains.append(y - x)
    g = np.stack(gains)
    return float(g.mean()), paired_se(g)


def curve(samples: list[pd.DataFrame], metrics: list[pd.DataFrame], column: str) -> list[dict]:
    """One method's curve over its runs (seeds): per evaluation (step 0, the base model, first) the mean value, the
    paired gain over the base model and its SE, and the cost spent to get there (means over the runs: training
    images, reward queries, UNet passes, wall time) and the KL to the base model."""
    n = min(len(eval_steps(s)) for s in samples)
    points = []
    for k in range(n):
        vals = [_values(s, column, eval_steps(s)[k]).mean() if column in s else math.nan for s in samples]
        g, se = paired(samples, column, 0, k) if k else (0.0, 0.0)
        row = {"point": k, "value": float(np.mean(vals)), "gain": g, "gain_se": se,
               "gain_in_se": g / se if se > 0 else (0.0 if k == 0 else math.nan)}
        for col, _ in COST_AXES + (("kl_to_base", ""),):
            per_run = []
            for s, m in zip(samples, metrics):
                step = eval_steps(s)[k]
                at = m[m["step"] == step]
                if col == "unet_passes":
                    v = (at["unet_fwd"] + at["unet_bwd"]) if len(at) and "unet_fwd" in at else pd.Series(dtype=float)
                else:
                    v = at[col] if col in at else pd.Series(dtype=float)
                v = v.dropna()
                per_run.append(float(v.iloc[-1]) if len(v) else (0.0 if step == 0 else math.nan))
            row[col] = float(np.mean(per_run))
        points.append(row)
    return points


def area(points: list[dict], budgets: list[int]) -> float:
    """The gain averaged over the budget range on a log2 axis (module docstring): trapezoids through the points at
    the protocol's nominal ``budgets`` (the curve's points after the base model, in order), over the range's width."""
    gains = [p["gain"] for p in points[1:len(budgets) + 1]]
    if len(gains) != len(budgets) or any(math.isnan(g) for g in gains):
        return math.nan
    if len(budgets) == 1:
        return float(gains[0])
    x = np.log2(np.asarray(budgets, dtype=float))
    y = np.asarray(gains, dtype=float)
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def crossing(points: list[dict], sigma: float) -> float | None:
    """The training images at which a least-squares line of gain-in-SE against log2(images), through the curve's
    points after the base model, reaches ``sigma`` (an extrapolation, module docstring); None when the line does
    not rise or there are fewer than two points."""
    pts = [(p["images"], p["gain_in_se"]) for p in points[1:]
           if p["images"] and p["images"] > 0 and not math.isnan(p["gain_in_se"])]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    x = np.log2([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    slope, intercept = np.polyfit(x, y, 1)
    if slope <= 0:
        return None
    return float(2 ** ((sigma - intercept) / slope))


def overoptimisation(samples: list[pd.DataFrame], metrics: list[pd.DataFrame], proxy: str, gold: str,
                     sigma: float) -> dict:
    """Proxy and gold against the KL to the base model per evaluation, and the flag's rule (module docstring):
    ``{"points": [{kl, proxy_gain, gold_gain, proxy_effect, gold_effect}], "peak": b*, "drop": (G, SE),
    "rise": (G, SE), "flag": bool, "why": text}``.  ``*_effect``: the gain in units of the base images' standard
    deviation, so proxy and gold share one axis."""
    p_curve, g_curve = curve(samples, metrics, proxy), curve(samples, metrics, gold)
    base_sd = {}
    for col in (proxy, gold):
        v = np.concatenate([_values(s, col, 0) for s in samples if col in s]) if all(col in s for s in samples) \
            else np.array([])
        base_sd[col] = float(v.std(ddof=1)) if len(v) > 1 and v.std(ddof=1) > 0 else math.nan
    points = [{"kl": pp["kl_to_base"], "images": pp["images"], "proxy": pp["value"], "gold": gp["value"],
               "proxy_gain": pp["gain"], "gold_gain": gp["gain"],
               "proxy_effect": pp["gain"] / base_sd[proxy], "gold_effect": gp["gain"] / base_sd[gold]}
              for pp, gp in zip(p_curve, g_curve)]
    out = {"points": points, "peak": None, "drop": (math.nan, math.nan), "rise": (math.nan, math.nan),
           "flag": False, "why": ""}
    golds = [p["gold"] for p in points]
    if len(points) < 2 or any(math.isnan(v) for v in golds):
        return out
    peak, last = int(np.argmax(golds)), len(points) - 1
    out["peak"] = peak
    if peak == last:
        out["why"] = "gold highest at the largest budget"
        return out
    drop, rise = paired(samples, gold, peak, last), paired(samples, proxy, peak, last)
    out.update(drop=drop, rise=rise)
    fell = drop[1] > 0 and drop[0] < -sigma * drop[1]
    out["flag"] = bool(fell and rise[0] > 0)
    out["why"] = (f"gold {drop[0]:+.3g} ({drop[0] / drop[1]:+.1f} SE) and proxy {rise[0]:+.3g} from evaluation "
                  f"{peak} (its gold peak) to the last" if drop[1] > 0 else "no spread in the gold")
    return out


def save_figure(fig, stem: str, dpi: int = 110) -> list[str]:
    """Write `fig` as stem.png and stem.svg (each atomically, ``store.save_figure``).  The SVG carries no date and
    fixed element ids, so the same numbers give the same bytes (no churn in committed pages)."""
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "diffalign"}):
        store.save_figure(fig, f"{stem}.png", dpi=dpi)
        store.save_figure(fig, f"{stem}.svg", dpi=dpi, metadata={"Date": None})
    return [f"{stem}.png", f"{stem}.svg"]


def _method_styles(plt, methods: list[str]) -> dict[str, dict]:
    """A line style per method, told apart in print: ten colours, then the same colours dashed with square marks."""
    return {m: {"color": plt.get_cmap("tab10")(i % 10), "ls": "-" if i < 10 else "--", "marker": "os^D"[i // 10 % 4]}
            for i, m in enumerate(methods)}


def curves_figure(title: str, rewards: list[str], curves: dict, stem: str) -> list[str]:
    """The budget curves: a row per reward, a column per cost axis (training images, reward queries, UNet passes,
    wall time, log scale), the eval reward of every method at each budget (mean over seeds), the base model dashed."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from bench.outputs.plots import pyplot

    plt = pyplot()
    methods = sorted({m for rw in rewards for m in curves.get(rw, {})})
    style = _method_styles(plt, methods)
    fig, axes = plt.subplots(len(rewards), len(COST_AXES), figsize=(4.0 * len(COST_AXES), 3.0 * len(rewards) + 1.2),
                             squeeze=False)
    for row, reward in zip(axes, rewards):
        base = next((c["points"][0]["value"] for c in curves.get(reward, {}).values()), None)
        for ax, (col, label) in zip(row, COST_AXES):
            for m in methods:
                c = curves.get(reward, {}).get(m)
                if not c:
                    continue
                pts = [q for q in c["points"][1:] if q[col] and q[col] > 0 and not math.isnan(q[col])]
                if pts:
                    ax.plot([q[col] for q in pts], [q["value"] for q in pts], ms=3, lw=1.2, label=m, **style[m])
            if base is not None:
                ax.axhline(base, color="k", ls=":", lw=1.0, label="base model")
            ax.set_xscale("log", base=2 if col in ("images", "reward_queries") else 10)  # budgets double
            if col not in ("images", "reward_queries"):
                ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
        row[0].set_ylabel(f"eval {reward}", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # a method missing from the first panel still gets its legend entry
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.02 * (len(labels) // 8), 1, 0.97))
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def overopt_figure(title: str, overopt: dict, gold: dict, stem: str) -> list[str]:
    """Proxy and gold against the KL to the base model (Gao et al.'s axes), a panel per method and gold reward: each
    as its gain over the base model in units of the base images' standard deviation, one point per evaluation (the
    base model at KL 0); a flagged method's panel title says so, in red."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    from bench.outputs.plots import pyplot

    plt = pyplot()
    panels = [(rw, m) for rw in overopt for m in sorted(overopt[rw])]
    if not panels:
        return []
    cols = min(5, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows + 0.8), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (reward, m) in zip(axes.flat, panels):
        o = overopt[reward][m]
        pts = [q for q in o["points"] if not math.isnan(q["kl"])]
        ax.plot([q["kl"] for q in pts], [q["proxy_effect"] for q in pts], marker="o", ms=3, label=f"proxy: {reward}")
        ax.plot([q["kl"] for q in pts], [q["gold_effect"] for q in pts], marker="s", ms=3, ls="--",
                label=f"gold: {gold[reward]}")
        ax.axhline(0, color="k", lw=0.5)
        ax.set_title(f"{m} on {reward}" + (" - FLAGGED" if o["flag"] else ""), fontsize=8,
                     color="tab:red" if o["flag"] else "k")
        ax.set_xlabel("KL to base", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}k" if abs(v) >= 1000 else f"{v:g}"))
        ax.set_ylabel("gain (base SDs)", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=6, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    paths = save_figure(fig, stem)
    plt.close(fig)
    return paths


def markdown_sections(p, board: dict) -> list[str]:
    """A version-2 leaderboard's part of ``leaderboard.md``, before its tables at the largest budget: the curves
    (figures), the eval reward at every budget with the area ranking, proxy against gold with the flag, the tuning
    and the transfer.  ``p``: the protocol (``bench.drivers.leaderboard.Protocol``); ``board``: what its ``build``
    returns."""
    b = board["budgets"]
    head = " | ".join(f"{x} images" for x in p.budgets)
    lines = ["## Budget curves", "",
             "![eval reward against training images, reward queries, UNet passes and wall time](budget_curves.png)",
             "", "Every method's eval reward (mean over seeds) at each budget against four costs; the base model "
             "dashed.  A preference method's images are its pool, drawn before training (its cost in images is "
             "spent at once); OGDM generates none.", ""]
    if p.gold:
        pairs = ", ".join(f"{k} against {v}" for k, v in p.gold.items())
        lines += ["## Proxy against gold", "", "![proxy and gold against the KL to the base model](overopt.png)", "",
                  f"Over-optimisation curves ({pairs}): gains over the base model in units of the base images' "
                  "standard deviation, against the KL to the base model (Gao, Schulman, Hilton, arXiv 2210.10760).  "
                  f"**Flag**: the gold falls by more than {p.sigma:g} paired SE from its best evaluation to the last "
                  "while the proxy still rises.", "",
                  "| reward | method | gold's best evaluation | gold, best -> last (SE) | proxy, best -> last "
                  "| proxy gain at the end (SE) | gold gain at the end (SE) | KL at the end | flag |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for reward, per in b["overopt"].items():
            for m, o in sorted(per.items()):
                if o["peak"] is None:
                    continue
                last = o["points"][-1]
                pc = b["curves"][reward][m]["points"][-1]
                gold_end = board["table"][reward][m]
                gz = gold_end.get("fidelity_change_in_se") if p.gold[reward] == "fidelity" else \
                    gold_end.get(f"{p.gold[reward]}_change_in_se")
                peak = "base model" if o["peak"] == 0 else f"{p.budgets[o['peak'] - 1]} images"
                drop = (f"{o['drop'][0]:+.3g} ({o['drop'][0] / o['drop'][1]:+.1f})"
                        if o["drop"][1] and not math.isnan(o["drop"][1]) else "-")
                rise = f"{o['rise'][0]:+.3g}" if not math.isnan(o["rise"][0]) else "-"
                lines.append(f"| {reward} | {m} | {peak} | {drop} | {rise} | {pc['gain_in_se']:+.1f} | "
                             f"{fmt(gz)} | {fmt(last['kl'])} | {'FLAGGED' if o['flag'] else '-'} |")
        lines.append("")
    lines += ["## Eval reward at each budget", "",
              "Each cell: the eval reward (mean over seeds) and, in brackets, its paired gain over the base model in "
              f"SE; `beyond {p.sigma:g} SE at`: the budgets where that gain exceeds {p.sigma:g}.  Area: the gain "
              "averaged over the budgets on a log2 axis (reward units; `bench/outputs/budgets.py`); the rows are "
              "ranked by it (sample efficiency).  Costs: at the largest budget.", ""]
    for reward in p.rewards:
        cur = b["curves"].get(reward, {})
        base = next((c["points"][0]["value"] for c in cur.values()), math.nan)
        lines += [f"### {reward}", "", f"Base model: {fmt(base, 4)}.", "",
                  f"| area rank | method | seeds | {head} | beyond {p.sigma:g} SE at | area | images | reward queries "
                  "| UNet passes | wall (s) |",
                  "|---|---|---|" + "---|" * len(p.budgets) + "---|---|---|---|---|---|"]
        order = sorted(cur, key=lambda m: (cur[m].get("area_rank", 99), m))
        for m in order:
            c, e = cur[m], board["table"][reward][m]
            cells, beyond = [], []
            for b_, q in zip(p.budgets, c["points"][1:len(p.budgets) + 1]):
                z = q["gain_in_se"]
                cells.append(f"{fmt(q['value'], 4)} ({'-' if math.isnan(z) else f'{z:+.1f}'})")
                if z > p.sigma:
                    beyond.append(str(b_))
            cells += ["-"] * (len(p.budgets) - len(cells))
            end = c["points"][-1]
            lines.append(f"| {c.get('area_rank', '-')} | {m} | {e['seeds']}/{e['planned']} | " + " | ".join(cells)
                         + f" | {', '.join(beyond) or 'none'} | {fmt(c['area'])} | {fmt(end['images'])} | "
                         f"{fmt(end['reward_queries'])} | "
                         f"{fmt(end['unet_passes'])} | {fmt(end['wall_time'])} |")
        for m in sorted(m for m in p.methods if m not in cur):
            e = board["table"][reward][m]
            why = (f"refused: {e['refused']}" if e.get("refused") else f"not run yet (0 of {e['planned']})"
                   if e.get("planned") else "not planned yet: its tuning has not finished")
            lines.append(f"| - | {m} | 0 | {why} |" + " |" * (len(p.budgets) + 5))
        lines.append("")
    if p.tuning:
        t = p.tuning
        n = max(len(spec["search"]) for spec in p.methods.values())
        lines += ["## Tuning", "",
                  f"Every method tried its {n} configurations (`search:` in the protocol file, the first its preset) "
                  f"on {t['reward']}, training seed {t['seed']}, eval noise seeds from {t['eval_first_seed']} (no "
                  f"evaluation run uses either), to the largest budget; rule `{t['rule']}`: the highest final eval "
                  "reward, ties to the earlier configuration; the pick is frozen for every reward and seed.  Each "
                  "cell: the configuration's final eval reward on the tuning reward (`refused` = the harness refused "
                  "it, `-` = not run yet).", "",
                  "| method | " + " | ".join(f"config {i + 1}" for i in range(n)) + " | chosen | its settings |",
                  "|---|" + "---|" * (n + 2)]
        for m in p.methods:
            ch = b["tuning"].get(m)
            scores = (ch or {}).get("scores") or []
            cells = []
            for i in range(n):
                if i < len(scores):
                    cells.append("refused" if scores[i] is None else fmt(scores[i], 4))
                else:
                    cells.append("-")
            chosen = "tuning not finished" if ch is None else (
                "none (every configuration refused)" if ch["index"] is None else f"config {ch['index'] + 1}")
            settings = ", ".join(ch["config"]) if ch and ch.get("config") else ("preset" if ch and ch.get(
                "index") == 0 else "-")
            lines.append(f"| {m} | " + " | ".join(cells) + f" | {chosen} | {settings} |")
        lines += ["", "## Transfer", "",
                  f"Tuned on {t['reward']}; the gain at the largest budget there, beside the other rewards the frozen "
                  "settings were run on.", "",
                  f"| method | gain on {t['reward']} (SE) | other rewards beaten (> {p.sigma:g} SE) |", "|---|---|---|"]
        for m, tr in b["transfer"].items():
            lines.append(f"| {m} | {fmt(tr['gain_in_se_on_tuning_reward'], 2)} | "
                         f"{len(tr['others_beaten'])} of {len(tr['others_run'])}"
                         + (f": {', '.join(tr['others_beaten'])}" if tr["others_beaten"] else "") + " |")
        lines.append("")
    return lines
