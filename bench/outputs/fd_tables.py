"""A run's sample quality against the number of function evaluations: ``fd_nfe.csv``, ``fd_nfe.md``, ``fd_nfe.png``.

Rows: the base model (the step-0 evaluation), the run's final model, and any companion run (OGDM's gamma = 0
baseline) at its final step; columns: the Frechet distance at each NFE of ``eval.fd.nfe`` (``bench.core.fd``).
Written by the harness at the end of every run that has ``fd`` in ``eval.metrics``.
"""
from __future__ import annotations

import math
import re

import pandas as pd

from bench.outputs.plots import pyplot
from diffalign.store import atomic_write_text, save_figure, write_table

FD_COLUMN = re.compile(r"^fd_nfe(\d+)$")
STEM = "fd_nfe"


def fd_columns(row: dict) -> dict[int, float]:
    """{NFE: FD} of a metrics row (finite values only)."""
    out = {}
    for k, v in row.items():
        m = FD_COLUMN.match(str(k))
        if m and v is not None and not (isinstance(v, float) and math.isnan(v)):
            out[int(m.group(1))] = float(v)
    return dict(sorted(out.items()))


def fd_rows(metrics: pd.DataFrame, label: str, with_base: bool) -> list[tuple[str, int, dict[int, float]]]:
    """(label, step, {NFE: FD}) for the base model (step 0) and the last step that has FD values."""
    out = []
    rows = [r for r in metrics.to_dict("records") if fd_columns(r)]
    if not rows:
        return out
    first, last = rows[0], rows[-1]
    if with_base and int(first["step"]) == 0:
        out.append(("base model", 0, fd_columns(first)))
    if int(last["step"]) != 0:
        out.append((label, int(last["step"]), fd_columns(last)))
    return out


def write(folder_path: str, rows: list[tuple[str, int, dict[int, float]]], title: str = "") -> list[str]:
    """The table (CSV + parquet, Markdown) and the plot of FD against NFE; returns the paths written."""
    if not rows:
        return []
    nfes = sorted({n for _, _, fd in rows for n in fd})
    df = pd.DataFrame([{"model": label, "step": step, **{f"nfe_{n}": fd.get(n) for n in nfes}}
                       for label, step, fd in rows])
    stem = f"{folder_path}/{STEM}"
    write_table(df, stem)
    lines = [f"Frechet distance to real images against NFE (DDIM steps, eval sampler){': ' + title if title else ''}",
             "", "| model | step | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "| --- | --- | " + " | ".join("---" for _ in nfes) + " |"]
    for label, step, fd in rows:
        lines.append(f"| {label} | {step} | " + " | ".join(f"{fd[n]:.3f}" if n in fd else "" for n in nfes) + " |")
    atomic_write_text(stem + ".md", "\n".join(lines) + "\n")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.4))
    for label, step, fd in rows:
        xs = sorted(fd)
        ax.plot(xs, [fd[n] for n in xs], marker="o", label=f"{label} (step {step})")
    ax.set_xscale("log")
    ax.set_xticks(nfes, [str(n) for n in nfes])
    ax.set_xlabel("NFE (DDIM steps)")
    ax.set_ylabel("Frechet distance")
    ax.set_title(title or "sample quality against NFE", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, stem + ".png", dpi=120)
    plt.close(fig)
    return [stem + ".csv", stem + ".md", stem + ".png"]


def sweep_markdown(runs, label_of) -> str:
    """FD against NFE over a sweep: the base model (step 0, the same for every run with the same eval) and each
    group's final FD, mean +/- standard error over its seeds; ``label_of(run, runs)`` names a group."""
    import numpy as np

    with_fd = [r for r in runs if any(FD_COLUMN.match(str(c)) for c in r.df.columns)]
    if not with_fd:
        return ""
    groups: dict[tuple[str, str], list] = {}
    for r in with_fd:
        groups.setdefault((r.reward, label_of(r, with_fd)), []).append(r)
    nfes = sorted({n for r in with_fd for row in r.df.to_dict("records") for n in fd_columns(row)})

    def cell(values: list[float]) -> str:
        v = np.array(values, dtype=float)
        if not len(v):
            return "-"
        return f"{v.mean():.2f} ± {v.std(ddof=1) / np.sqrt(len(v)):.2f}" if len(v) > 1 else f"{v.mean():.2f}"

    lines = ["| model | reward | seeds | " + " | ".join(f"FD at NFE {n}" for n in nfes) + " |",
             "|" + "|".join(" --- " for _ in range(3 + len(nfes))) + "|"]
    for reward in sorted({k[0] for k in groups}):
        members = [r for (rw, _), rs in groups.items() if rw == reward for r in rs]
        first = [fd_columns(r.df[r.df["step"] == 0].iloc[0].to_dict()) for r in members if (r.df["step"] == 0).any()]
        lines.append(f"| base model (step 0) | {reward} | {len(first)} | "
                     + " | ".join(cell([f[n] for f in first if n in f]) for n in nfes) + " |")
        for (rw, label), rs in sorted(groups.items()):
            if rw != reward:
                continue
            last = [fd_rows(r.df, label, False)[-1][2] for r in rs if fd_rows(r.df, label, False)]
            lines.append(f"| {label} | {reward} | {len(last)} | "
                         + " | ".join(cell([f[n] for f in last if n in f]) for n in nfes) + " |")
    note = "Frechet distance to real images (lower is better) at each NFE of the eval sampler, mean ± SE over seeds."
    return "\n".join(lines) + "\n\n" + note + "\n"
