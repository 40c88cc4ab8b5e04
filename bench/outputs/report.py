"""The HTML report: ``python -m bench report RUNS... --out report.html``.

One self-contained static page: every figure is embedded as a data URI (PNG), so the file can be moved,
mailed or opened from disk with no server and no network; it has no script and loads nothing from
outside.  It shows

- the curves of ``bench compare`` (a line per method, +/- 1 SE over seeds; a colour per method, a line style per
  variant; a figure per training reward): by default the eval reward against the budget first (images generated,
  then UNet passes, then optimizer steps: methods take 20 to 90 steps of very different sizes, so steps alone
  compare little), then every held-out metric against images generated; ``--x X`` draws them all against X only,
- the paper table of ``bench table``, cut into tables that fit an ordinary window (reward and held-out metrics;
  Frechet distance; cost), the method column repeated in each and wrapped, numbers never wrapped,
- the side-by-side grid (the base model and a row per method on the same eval prompts and seed),
- every run: its config, summary and a link to its folder (relative to the page, so the links work
  as long as the page stays beside the store it was written from).
"""
from __future__ import annotations

import base64
import datetime
import html
import json
import os
import tempfile

import numpy as np
import yaml

from bench.outputs import table
from bench.outputs.compare import RunData, groups, mean_curve, plot_curves, side_by_side
from bench.outputs.table import heldout_metrics
from diffalign import store
from diffalign.errors import BenchError

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em 3em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 2em; }
p, details { max-width: 70em; }
.wide { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; font-size: 0.85em; }
th, td { padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { border-bottom: 1px solid #444; } td:nth-child(-n+3), th:nth-child(-n+3) { text-align: left; }
th { white-space: normal; vertical-align: bottom; }
.paper td, .paper th { text-align: right; }
.paper td:first-child { white-space: normal; min-width: 8em; max-width: 22em; }
.k2 td:nth-child(-n+2), .k2 th:nth-child(-n+2), .k3 td:nth-child(-n+3), .k3 th:nth-child(-n+3),
.k4 td:nth-child(-n+4), .k4 th:nth-child(-n+4) { text-align: left; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; } .figures img { width: 26em; max-width: 100%; }
img { max-width: 100%; height: auto; } img.grid { image-rendering: pixelated; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
details { margin: 0.3em 0; } .note { color: #666; font-size: 0.85em; }
"""


def data_uri(path: str) -> str:
    mime = {".png": "image/png", ".svg": "image/svg+xml"}[os.path.splitext(path)[1]]
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode("ascii")


def _img(path: str, alt: str, cls: str = "") -> str:
    return f'<img src="{data_uri(path)}" alt="{html.escape(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


VALUE_WIDTH_CH = 110  # the number columns of one table, in characters (cell text + padding): ~800 px at 0.85em


def _part(col: str) -> int:
    """0: the eval reward and held-out metrics, 1: Frechet distances, 2: costs (to threshold, memory, passes)."""
    if table.FD_COLUMN.match(col):
        return 1
    return 2 if col.endswith("_to_threshold") or col in ("peak_mem_mb", "unet_passes_per_step") else 0


PART_TITLES = ("Final eval reward and held-out metrics", "Frechet distance at each NFE (lower is better)",
               "Cost: to the eval-reward threshold, peak memory, UNet passes per step")


def split_columns(cols: list[str], widths: dict[str, int], budget: int = VALUE_WIDTH_CH) -> list[list[str]]:
    """The value columns in the parts of ``_part`` (in order), each part cut where its width passes ``budget``."""
    out = []
    for k in range(len(PART_TITLES)):
        chunk, used = [], 0
        for c in (c for c in cols if _part(c) == k):
            if chunk and used + widths[c] > budget:
                out.append(chunk)
                chunk, used = [], 0
            chunk.append(c)
            used += widths[c]
        if chunk:
            out.append(chunk)
    return out


def _table_html(runs: list[RunData], threshold: float | None) -> str:
    """The paper table as HTML tables that fit a window: the value columns cut into parts (``split_columns``), the
    method column (wrapped) and seeds repeated in each, reward and eval prompts only where they vary (otherwise said
    once above)."""
    frame, directions, thresholds = table.build(runs, threshold)
    headers, rows = table.cells(frame, directions, latex=False)
    value_cols = [c for c in directions if c in frame]  # headers[4:], in order
    keys = [0] + [i for i in (1, 2) if len({r[i] for r in rows}) > 1] + [3]
    same = [f"{headers[i]} {rows[0][i]}" for i in (1, 2) if i not in keys and rows]

    def cell(text: str, i: int) -> str:
        bold = text.startswith("**") and text.endswith("**")
        text = html.escape(text.strip("*") if bold else text)
        if i == 0:  # the method (wraps): a long 'method [variant/...]' may break after each '/'
            text = text.replace("/", "/<wbr>")
        return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"

    widths = {c: max([len(r[4 + i].strip("*")) for r in rows] + [max(map(len, headers[4 + i].split()))]) + 3
              for i, c in enumerate(value_cols)}
    out = [f"<p class=note>Every row: {html.escape(', '.join(same))}.</p>"] if same else []
    titled = set()
    for cols in split_columns(value_cols, widths):
        idx = keys + [4 + value_cols.index(c) for c in cols]
        head = "<tr>" + "".join(f"<th>{html.escape(headers[i])}</th>" for i in idx) + "</tr>"
        body = "".join("<tr>" + "".join(cell(r[i], i) for i in idx) + "</tr>" for r in rows)
        part = _part(cols[0])
        title = PART_TITLES[part] + (" (continued)" if part in titled else "")
        titled.add(part)
        out.append(f"<h3>{html.escape(title)}</h3><div class='wide paper k{len(keys)}'><table>{head}{body}</table>"
                   "</div>")
    return "".join(out) + f"<p class=note>{html.escape(table.caption(thresholds))}</p>"


def _run_html(run: RunData, page_dir: str) -> str:
    rel = os.path.relpath(os.path.abspath(run.path), page_dir)
    name = os.path.basename(os.path.normpath(run.path))
    s = run.summary or {}
    line = ""
    if s:
        line = (f"eval reward {s.get('eval_reward_before', float('nan')):.4f} &rarr; "
                f"{s.get('eval_reward_after', float('nan')):.4f} ({s.get('eval_reward_gain_in_se', 0):+.1f} SE), "
                f"{s.get('steps')} steps in {s.get('wall_time_s', 0):.0f} s")
    cfg = html.escape(yaml.safe_dump(run.cfg, sort_keys=False, default_flow_style=None))
    manifest = html.escape(json.dumps({k: run.manifest.get(k) for k in ("status", "start_time", "end_time", "git",
                                                                         "device", "torch_threads", "resumes")
                                       if k in run.manifest}, indent=1, default=str))
    # a slimmed sweep (committed results) keeps no start-vs-end grid: link it only where it is
    has_grid = os.path.isfile(os.path.join(run.path, "grids", "start_vs_end.png"))
    grid = f' &middot; <a href="{html.escape(rel)}/grids/start_vs_end.png">start vs end grid</a>' if has_grid else ""
    return (f'<details><summary><a href="{html.escape(rel)}/">{html.escape(name)}</a> &mdash; '
            f"{html.escape(run.method)} / {html.escape(run.reward)} / seed {run.seed}"
            f"{' &mdash; ' + line if line else ''}</summary>"
            f'<p><a href="{html.escape(rel)}/metrics.csv">metrics.csv</a>{grid}</p>'
            f"<pre>{cfg}</pre><pre>{manifest}</pre></details>")


BUDGET_AXES = ("images", "unet_passes", "step")  # the report's default: the budget first, steps last


def _figures(paths: list[str]) -> str:
    images = "".join(_img(p, os.path.basename(p)) for p in paths if p.endswith(".png"))
    return f'<div class="figures">{images}</div>'


def _moves(runs: list[RunData], metric: str, x: str) -> bool:
    """Whether some group of runs that has ``metric`` has an ``x`` that changes over its evaluations."""
    for members in groups(runs).values():
        xs, _, _, n = mean_curve(members, metric, x)
        if n and len(xs) > 1 and float(np.nanmax(xs)) > float(np.nanmin(xs)):
            return True
    return False


def write_report(runs: list[RunData], out: str, metrics: list[str] | None = None, x: str | None = None,
                 grid_step: int | None = None, threshold: float | None = None, title: str = "DiffAlign report") -> str:
    """The page (module docstring).  ``x`` None: the eval reward (or the first metric) against each of
    ``BUDGET_AXES``, then the other metrics against images generated; ``x`` given: every metric against it."""
    complete = [r for r in runs if r.complete]
    if not complete:
        raise BenchError("no complete run to report on; accepted: run folders whose manifest says complete")
    metrics = metrics or ["eval_reward_mean"] + heldout_metrics(complete)
    page_dir = os.path.dirname(os.path.abspath(out))
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=note>{len(complete)} complete runs, written "
             f"{datetime.datetime.now().isoformat(timespec='seconds')} by <code>bench report</code>.</p>"]
    band = ("Mean over seeds, band (or bar) = &plusmn;1 SE; a colour per method, a line style and marker per "
            "variant; a figure per training reward.")
    with tempfile.TemporaryDirectory() as tmp:
        if x is None:
            first = "eval_reward_mean" if "eval_reward_mean" in metrics else metrics[0]
            parts.append(f"<h2>Curves: {html.escape(first)} against the budget</h2>"
                         "<p class=note>Images generated first, then UNet passes (forward + backward, in images), "
                         "then optimizer steps: the methods take 20 to 90 steps of very different sizes, so a step "
                         "is no common unit.  A method whose count never moves (OGDM generates no images; DDE and "
                         f"Diffusion-DPO draw their whole pool before their first step) is a vertical line.  {band}"
                         "</p>")
            parts.append(_figures([p for axis in BUDGET_AXES for p in plot_curves(complete, [first], axis, tmp)]))
            rest = [m for m in metrics if m != first]
            on_images = [m for m in rest if _moves(complete, m, "images")]
            if on_images:
                parts.append(f"<h2>Curves: held-out metrics against images generated</h2><p class=note>{band}</p>")
                parts.append(_figures(plot_curves(complete, on_images, "images", tmp)))
            if len(on_images) < len(rest):  # only methods that generate no images have these (OGDM's FD)
                others = [m for m in rest if m not in on_images]
                parts.append(f"<h2>Curves: {html.escape(', '.join(others))} against UNet passes</h2>"
                             "<p class=note>Only runs that generate no images have these metrics, so they are drawn "
                             f"against UNet passes.  {band}</p>")
                parts.append(_figures(plot_curves(complete, others, "unet_passes", tmp)))
        else:
            parts.append(f"<h2>Curves against {html.escape(x)}</h2><p class=note>{band}</p>")
            parts.append(_figures(plot_curves(complete, metrics, x, tmp)))
        parts.append("<h2>Table</h2>" + _table_html(complete, threshold))
        parts.append("<h2>Samples: base model and every method, same eval prompts and seed</h2>")
        for reward in sorted({r.reward for r in complete}):
            grid = os.path.join(tmp, f"grid-{len(parts)}.png")
            try:
                side_by_side([r for r in complete if r.reward == reward], grid, step=grid_step)
                parts.append(f"<h3>{html.escape(reward)}</h3>" + _img(grid, f"samples on {reward}", "grid"))
            except BenchError as e:
                parts.append(f"<p class=note>No grid for {html.escape(reward)}: {html.escape(str(e))}</p>")
    parts.append("<h2>Runs</h2>" + "".join(_run_html(r, page_dir) for r in runs))
    page = ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title><link rel=icon href='data:,'><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
    store.atomic_write_text(out, page)
    return out
