"""The HTML report: ``python -m bench report RUNS... --out report.html``.

One self-contained static page: every figure is embedded as a data URI (PNG), so the file can be moved,
mailed or opened from disk with no server and no network; it has no script and loads nothing from
outside.  It shows

- the curves of ``bench compare`` (eval reward and every held-out metric, a line per method, +/- 1 SE),
- the paper table of ``bench table``,
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

import yaml

from bench.outputs import table
from bench.outputs.compare import RunData, plot_curves, side_by_side
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
.figures { display: flex; flex-wrap: wrap; gap: 1em; } .figures img { width: 30em; max-width: 100%; }
img.grid { max-width: 100%; image-rendering: pixelated; }
pre { background: #f6f6f6; padding: 0.6em; font-size: 0.8em; overflow-x: auto; }
details { margin: 0.3em 0; } .note { color: #666; font-size: 0.85em; }
"""


def data_uri(path: str) -> str:
    mime = {".png": "image/png", ".svg": "image/svg+xml"}[os.path.splitext(path)[1]]
    with open(path, "rb") as f:
        return f"data:{mime};base64," + base64.b64encode(f.read()).decode("ascii")


def _img(path: str, alt: str, cls: str = "") -> str:
    return f'<img src="{data_uri(path)}" alt="{html.escape(alt)}"' + (f' class="{cls}"' if cls else "") + ">"


def _table_html(runs: list[RunData], threshold: float | None) -> str:
    frame, directions, thresholds = table.build(runs, threshold)
    headers, rows = table.cells(frame, directions, latex=False)

    def cell(text: str) -> str:
        bold = text.startswith("**") and text.endswith("**")
        text = html.escape(text.strip("*") if bold else text)
        return f"<td><b>{text}</b></td>" if bold else f"<td>{text}</td>"

    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
    body = "".join("<tr>" + "".join(cell(c) for c in r) + "</tr>" for r in rows)
    return (f"<div class=wide><table>{head}{body}</table></div>"
            f"<p class=note>{html.escape(table.caption(thresholds))}</p>")


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
    return (f'<details><summary><a href="{html.escape(rel)}/">{html.escape(name)}</a> &mdash; '
            f"{html.escape(run.method)} / {html.escape(run.reward)} / seed {run.seed}"
            f"{' &mdash; ' + line if line else ''}</summary>"
            f'<p><a href="{html.escape(rel)}/metrics.csv">metrics.csv</a> &middot; '
            f'<a href="{html.escape(rel)}/grids/start_vs_end.png">start vs end grid</a></p>'
            f"<pre>{cfg}</pre><pre>{manifest}</pre></details>")


def write_report(runs: list[RunData], out: str, metrics: list[str] | None = None, x: str = "step",
                 grid_step: int | None = None, threshold: float | None = None, title: str = "DiffAlign report") -> str:
    complete = [r for r in runs if r.complete]
    if not complete:
        raise BenchError("no complete run to report on; accepted: run folders whose manifest says complete")
    metrics = metrics or ["eval_reward_mean"] + heldout_metrics(complete)
    page_dir = os.path.dirname(os.path.abspath(out))
    parts = [f"<h1>{html.escape(title)}</h1>",
             f"<p class=note>{len(complete)} complete runs, written "
             f"{datetime.datetime.now().isoformat(timespec='seconds')} by <code>bench report</code>.</p>"]
    with tempfile.TemporaryDirectory() as tmp:
        paths = plot_curves(complete, metrics, x, tmp)
        parts.append(f"<h2>Curves (against {html.escape(x)}; mean over seeds, band = &plusmn;1 SE)</h2>")
        parts.append('<div class="figures">' + "".join(_img(p, os.path.basename(p)) for p in paths
                                                       if p.endswith(".png")) + "</div>")
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
