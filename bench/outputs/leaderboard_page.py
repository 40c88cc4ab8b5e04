"""The leaderboard as one self-contained HTML page (``leaderboard.html``, written by ``bench.drivers.leaderboard``
beside ``leaderboard.md``, from the same numbers).

The page is built to be read in a browser window of ordinary width (checked at 1400 px by tests/bench/test_pages.py):

- within each reward's table the rows are **ranked by the gain in SE** (the paired gain over the base model in units
  of its standard error): the quantity **bold** marks and "beats base" uses, so a bold row never sits below a row
  with a smaller gain; the ``<th>`` of that column carries ``data-bold-column``;
- a method refused on a reward (or not run yet) gets a row of its own under the ranked rows: the reason in one
  cell spanning the number columns, wrapped, so it never widens a number column;
- headings, the method and the text columns wrap, numbers do not; every table sits in the page's ``.wide`` box
  (scrolls inside itself if a window is narrower still), and the figure is never wider than the page.
"""
from __future__ import annotations

import html
import math
import os
import re

from bench.outputs.report import STYLE, data_uri

PAGE_STYLE = STYLE + """
td.text { white-space: normal; text-align: left; min-width: 8em; max-width: 24em; }
td.why { white-space: normal; text-align: left; color: #555; }
tr.unranked td { color: #555; }
"""
FD_COL = "fd_nfe"


def fmt(x, digits: int = 3) -> str:
    """A number for a table: 3 significant digits (no exponent at 1000 and above), '-' for missing or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:.0f}"


def _inline(text: str) -> str:
    """A line of the Markdown: escaped, with its **bold** and `code`."""
    text = html.escape(text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _nan(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def ranked_by_gain(rows: dict[str, dict]) -> list[str]:
    """The methods with a number on a reward, largest gain in SE first (ties by name)."""
    have = [m for m, e in rows.items() if e.get("seeds") and not _nan(e.get("gain_in_se"))]
    return sorted(have, key=lambda m: (-rows[m]["gain_in_se"], m))


def _td(text: str, cls: str = "", bold: bool = False, colspan: int = 1) -> str:
    body = f"<b>{html.escape(text)}</b>" if bold else html.escape(text)
    attrs = (f' class="{cls}"' if cls else "") + (f" colspan={colspan}" if colspan > 1 else "")
    return f"<td{attrs}>{body}</td>"


def _reward_table(p, reward: str, rows: dict[str, dict]) -> list[str]:
    any_row = next((e for e in rows.values() if e.get("seeds")), {})
    fd_cols = sorted(k for k in any_row if k.startswith(FD_COL) and not k.endswith("_base"))
    held = [m for m in ("tiny-rating", "tiny-clip")
            if any(not _nan(e.get(m, math.nan)) for e in rows.values() if e.get("seeds"))]
    fid_base = any_row.get("fidelity", math.nan) - any_row.get("fidelity_change", math.nan)
    out = [f"<h2>{html.escape(reward)}</h2>",
           f"<p>Base model: eval reward {fmt(any_row.get('base', math.nan), 4)}, fidelity {fmt(fid_base)}"
           + "".join(f", FD at NFE {c[len(FD_COL):]} {fmt(any_row.get(c + '_base'))}" for c in fd_cols) + ".</p>"]
    head = (["rank", "method", "seeds", "gain (SE)", "final (± SE)", "fidelity (change in SE)"]
            + [f"{m} (change in SE)" for m in held] + [f"FD NFE {c[len(FD_COL):]}" for c in fd_cols]
            + ["KL to base", "images", "UNet passes", "wall (s)", "to threshold (images, seeds)", "hacking"])
    ths = "".join(f"<th data-bold-column>{html.escape(h)}</th>" if h == "gain (SE)" else f"<th>{html.escape(h)}</th>"
                  for h in head)
    body = []
    order = ranked_by_gain(rows)
    for rank, m in enumerate(order, 1):
        e = rows[m]
        name = m + (" (reward-free)" if p.methods.get(m, {}).get("reward_free") else "")
        gain = f"{e['gain_in_se']:+.1f}" + ("" if e["beats_base"] or e["gain_in_se"] > 0 else " (no gain)")
        cells = [_td(str(rank)), _td(name, "text"), _td(f"{e['seeds']}/{e['planned']}"),
                 _td(gain, bold=bool(e["beats_base"])), _td(f"{fmt(e['final'], 4)} ± {fmt(e['final_se'], 2)}"),
                 _td(f"{fmt(e['fidelity'])} ({e['fidelity_change_in_se']:+.1f})")]
        cells += [_td(f"{fmt(e[mm])} ({e[mm + '_change_in_se']:+.1f})") for mm in held]
        cells += [_td(fmt(e[c])) for c in fd_cols]
        to = f"{fmt(e['images_to_threshold'])}, {e['reached']}/{e['seeds']}" if e["reached"] else "not reached"
        cells += [_td(fmt(e["kl_to_base"])), _td(fmt(e["images"])), _td(fmt(e["unet_passes"])),
                  _td(fmt(e["wall_time_s"])), _td(to), _td(e["hacking"] or "", "text")]
        body.append("<tr>" + "".join(cells) + "</tr>")
    for m in sorted(m for m in rows if m not in order):  # refused or not run: a row of its own, the reason wrapped
        e = rows[m]
        why = (f"refused: {e['refused']}" if e.get("refused") else f"not run yet (0 of {e['planned']} seeds)"
               if not e.get("seeds") else "no paired gain (its eval images before and after do not match)")
        body.append("<tr class=unranked>" + _td("-") + _td(m, "text") + _td(f"{e.get('seeds', 0)}/{e['planned']}")
                    + _td(why, "why", colspan=len(head) - 3) + "</tr>")
    out.append(f"<div class=wide><table><tr>{ths}</tr>" + "".join(body) + "</table></div>")
    notes = [(m, rows[m]["diagnosis"]) for m in order if rows[m].get("diagnosis")]
    if notes:
        out.append(f"<p>No gain above {p.sigma:g} SE, measured (means over seeds):</p><ul>"
                   + "".join(f"<li>{html.escape(m)}: {html.escape(d)}</li>" for m, d in notes) + "</ul>")
    return out


def _overall(p, board: dict) -> list[str]:
    """Per method: its mean rank by gain in SE over the rewards it has a number on, and the board's own columns."""
    ranks: dict[str, list[int]] = {m: [] for m in p.methods}
    for reward in p.rewards:
        for i, m in enumerate(ranked_by_gain(board["table"][reward]), 1):
            ranks[m].append(i)
    mean = {m: sum(r) / len(r) if r else math.nan for m, r in ranks.items()}
    head = ["method", "mean rank (by gain in SE)", "rewards run", f"beats base (> {p.sigma:g} SE) on",
            "hacking flags", "refused on", "mean images / run", "mean wall (s) / run", "settings from"]
    body = []
    for m in sorted(p.methods, key=lambda m: (math.isnan(mean[m]), mean[m], m)):
        o = board["overall"][m]
        body.append("<tr>" + _td(m, "text") + _td(fmt(mean[m], 2)) + _td(str(o["rewards_run"]))
                    + _td(", ".join(o["beats_base_on"]) or "none", "text")
                    + _td(", ".join(o["hacking_on"]) or "-", "text")
                    + _td(", ".join(o["refused_on"]) or "-", "text") + _td(fmt(o["images"]))
                    + _td(fmt(o["wall_time_s"])) + _td(p.methods[m].get("tuned", ""), "text") + "</tr>")
    return ["<h2>Overall</h2>",
            "<div class=wide><table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
            + "".join(body) + "</table></div>"]


def _markdown_block(md: str, folder: str) -> list[str]:
    """A run of ``leaderboard.md`` (headings, paragraphs, pipe tables, images) as HTML; an image is embedded from
    ``folder``."""
    out, table = [], []

    def flush():
        if table:
            rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r) <= set("|-: ")]
            ths = "".join(f"<th>{_inline(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<div class=wide><table><tr>{ths}</tr>{body}</table></div>")
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        img = re.fullmatch(r"!\[(.*)\]\((.+)\)", line.strip())
        if img:
            path = os.path.join(folder, img.group(2))
            if os.path.isfile(path):
                out.append(f'<img src="{data_uri(path)}" alt="{html.escape(img.group(1))}">')
        elif line.startswith("### "):
            out.append(f"<h3>{_inline(line[4:])}</h3>")
        elif line.startswith("## "):
            out.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    flush()
    return out


def html_page(p, board: dict, md: str, figure_png: str | None, figures: list[str] | None = None) -> str:
    """The page: the Markdown's opening paragraphs (title, runs, sessions, what bold means); for a version-2
    protocol its budget curves and proxy-against-gold figures first, then its tables (every budget, the flag, the
    tuning, the transfer); the gains figure, a table per reward ranked by gain in SE, the overall table.  ``p`` is
    the protocol (``bench.drivers.leaderboard.Protocol``), ``board`` what ``build`` returns, ``md`` the text of
    ``leaderboard.md``, ``figures`` the version-2 figures written beside it."""
    out = []
    intro, _, rest = md.partition("\n## ")
    for line in intro.splitlines():  # everything before the first heading
        if line.startswith("# "):
            out.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if figures and "## At the largest budget" in md:
        v2 = ("## " + rest).split("\n## At the largest budget", 1)[0]
        out += _markdown_block(v2, os.path.dirname(figures[0]))
        out.append("<h2>" + _inline(md.split("\n## At the largest budget", 1)[1].split("\n", 1)[0].join(
            ("At the largest budget", ""))) + "</h2>")
    out.append(f"<p><b>Rank</b> (every table below): by the <b>gain in SE</b>, the paired gain over the base model in "
               f"units of its standard error: the quantity bold marks and &ldquo;beats base&rdquo; (&gt; {p.sigma:g} "
               "SE) uses, so no bold row sits below a row with a smaller gain.  (<code>leaderboard.md</code> and "
               "<code>leaderboard.json</code> rank by the final eval reward.)  A method refused on a reward, or not "
               "run yet, is listed under the ranked rows with the reason.</p>")
    if figure_png:
        out.append(f'<img src="{data_uri(figure_png)}" alt="gain in SE per method and reward">')
    for reward in p.rewards:
        out += _reward_table(p, reward, board["table"][reward])
    out += _overall(p, board)
    return ("<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>DiffAlign leaderboard</title>"
            "<meta name=viewport content='width=device-width, initial-scale=1'>"
            f"<link rel=icon href='data:,'><style>{PAGE_STYLE}</style></head>\n<body>\n" + "\n".join(out)
            + "\n</body></html>\n")
