"""A run's sample quality against the number of function evaluations: ``fd_nfe.csv``, ``fd_nfe.md``, ``fd_nfe.png``.

Rows: the base model (the step-0 evaluation), the run's final model, and any companion run (OGDM's gamma = 0
baseline) at its final step; columns: the Frechet distance at each NFE of ``eval.fd.nfe`` (``bench.quality``).
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
