"""The committed HTML pages read at a 1400 px wide window in a real headless browser (Debian's chromium): the
leaderboard (results/leaderboards/tiny-v1/leaderboard.html) and the paper report (docs/paper/report.html).

A copy of each page gets a script that, once the page has loaded, measures it and writes a JSON verdict into the
DOM (``<pre id="diffalign-verdict">``); chromium's ``--dump-dom`` prints the DOM, and the verdict is read out of it.
What it checks:

- no horizontal page scroll (``document.documentElement.scrollWidth <= window.innerWidth``);
- every table cell holding a number lies within the viewport horizontally, is rendered, and is not clipped (or
  scrolled away) by an ancestor whose overflow is not ``visible``;
- every ``<img>`` loaded and fits its container's width (and the viewport);
- in each table whose bolded cells sit in one column (or whose ``<th data-bold-column>`` names that column), the
  rows are sorted by that column, largest first, rows without a number last.

``test_checker_sees_a_broken_page`` runs the same checker on a page broken on purpose (a wide nowrap table, an
unbounded wide image, rows out of order), so a checker that sees nothing cannot pass.  Run this file as a script
(``python tests/bench/test_pages.py PAGE.html``) to print a page's verdict.
"""
from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LEADERBOARD = ROOT / "results" / "leaderboards" / "tiny-v1" / "leaderboard.html"
REPORT = ROOT / "docs" / "paper" / "report.html"
WIDTH, HEIGHT = 1400, 900
VERDICT_ID = "diffalign-verdict"

# Runs in the page once it has loaded (images decoded); writes the verdict as JSON into <pre id=VERDICT_ID>.
CHECKER = r"""
<script>
window.addEventListener('load', () => {
  const W = window.innerWidth, problems = [], TOL = 0.5, RANKED = __RANKED__;
  const where = el => el.tagName.toLowerCase() + (el.id ? '#' + el.id : '')
    + (typeof el.className === 'string' && el.className ? '.' + el.className.trim().split(/\s+/).join('.') : '');
  const numberOf = text => {
    const m = text.replace(/\u2212/g, '-').match(/[-+]?(\d+(\.\d*)?|\.\d+)(e[-+]?\d+)?/i);
    return m ? parseFloat(m[0]) : null;
  };
  const holdsNumber = text => /^[-+\u2212]?(\d|\.\d)/.test(text);
  const px = x => x.toFixed(0);
  const scrollWidth = document.documentElement.scrollWidth;
  if (scrollWidth > W) problems.push({kind: 'page scrolls sideways', why: `scrollWidth ${scrollWidth} > ${W}`});
  // the cells holding a number: rendered, in the viewport, not clipped (or scrolled away) by an ancestor
  let numbers = 0;
  for (const td of document.querySelectorAll('td')) {
    const text = td.textContent.trim();
    if (!holdsNumber(text)) continue;
    numbers++;
    const r = td.getBoundingClientRect(), s = getComputedStyle(td);
    let why = null;
    if (r.width <= 0 || r.height <= 0 || s.visibility !== 'visible') why = 'not rendered';
    else if (r.left < -TOL || r.right > W + TOL)
      why = `outside the viewport (left ${px(r.left)}, right ${px(r.right)}, window ${W})`;
    else for (let a = td.parentElement; a && a !== document.documentElement; a = a.parentElement) {
      const as = getComputedStyle(a);
      if (as.overflowX === 'visible' && as.overflowY === 'visible') continue;
      const ar = a.getBoundingClientRect();
      const left = ar.left + a.clientLeft, right = left + a.clientWidth;
      const top = ar.top + a.clientTop, bottom = top + a.clientHeight;
      if (as.overflowX !== 'visible' && (r.left < left - TOL || r.right > right + TOL)) {
        why = `clipped or scrolled away by ${where(a)} (overflow-x ${as.overflowX}; cell ${px(r.left)}..`
              + `${px(r.right)}, box ${px(left)}..${px(right)})`;
        break;
      }
      if (['hidden', 'clip'].includes(as.overflowY) && (r.top < top - TOL || r.bottom > bottom + TOL)) {
        why = `clipped vertically by ${where(a)}`;
        break;
      }
    }
    if (why) problems.push({kind: 'number cell', text: text.slice(0, 60), why});
  }
  // images: loaded, no wider than their container's content box, inside the viewport
  let images = 0;
  for (const img of document.images) {
    images++;
    const r = img.getBoundingClientRect(), p = img.parentElement, ps = getComputedStyle(p);
    const inner = p.clientWidth - parseFloat(ps.paddingLeft) - parseFloat(ps.paddingRight);
    const alt = img.alt || img.src.slice(0, 40);
    if (!(img.complete && img.naturalWidth > 0)) problems.push({kind: 'image', alt, why: 'not loaded'});
    else if (r.width > inner + TOL)
      problems.push({kind: 'image', alt, why: `wider (${px(r.width)} px) than its container (${px(inner)} px)`});
    else if (r.left < -TOL || r.right > W + TOL)
      problems.push({kind: 'image', alt, why: `outside the viewport (right ${px(r.right)})`});
  }
  // ranked tables (RANKED pages only): sorted by the column bold marks, or the one <th data-bold-column> names,
  // largest first, rows without a number last
  const ranked = [];
  if (RANKED) document.querySelectorAll('table').forEach((table, t) => {
    const rows = [...table.rows];
    if (!rows.length) return;
    const columns = row => { const out = []; let c = 0;
                             for (const cell of row.cells) { out.push([c, cell]); c += cell.colSpan; } return out; };
    const at = (row, k) => (columns(row).find(([c]) => c === k) || [null, null])[1];
    const heads = [...rows[0].cells].map(c => c.textContent.trim());
    const body = rows.filter(r => r.querySelector('td'));
    const bold = new Set();
    body.forEach(r => columns(r).forEach(([c, cell]) => { if (cell.querySelector('b, strong')) bold.add(c); }));
    const declared = columns(rows[0]).filter(([, th]) => th.hasAttribute('data-bold-column')).map(([c]) => c);
    if (declared.length && [...bold].some(k => k !== declared[0]))
      problems.push({kind: 'ranking', table: t, why: `bold in columns ${[...bold]}, declared column ${declared[0]}`});
    const col = declared.length ? declared[0] : (bold.size === 1 ? [...bold][0] : null);
    if (col === null) return;
    const values = body.map(r => { const cell = at(r, col), text = cell ? cell.textContent.trim() : '';
                                   return holdsNumber(text) ? numberOf(text) : null; });
    const sorted = values.every((b, i) => i === 0
                                || (values[i - 1] === null ? b === null : b === null || b <= values[i - 1]));
    ranked.push({table: t, column: heads[col] || String(col), values, sorted});
    if (!sorted) problems.push({kind: 'ranking', table: t, why: `rows not sorted by ${heads[col]}: ${values}`});
  });
  const pre = document.createElement('pre');
  pre.id = '__ID__';
  pre.textContent = JSON.stringify({innerWidth: W, scrollWidth, numbers, images, ranked, problems});
  document.body.appendChild(pre);
});
</script>
""".replace("__ID__", VERDICT_ID)


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def check_page(page: str | os.PathLike, workdir: str | os.PathLike, ranked: bool = True) -> dict:
    """The verdict of CHECKER on a copy of ``page`` (written into ``workdir``) in headless chromium at WIDTH x HEIGHT:
    ``{innerWidth, scrollWidth, numbers, images, ranked, problems}``; ``problems`` empty = the page passes.
    ``ranked``: check that tables with their bold in one column are sorted by it (the leaderboard; the report's
    table bolds the best of every column, which ranks nothing)."""
    workdir = Path(workdir)
    checker = CHECKER.replace("__RANKED__", "true" if ranked else "false")
    text = Path(page).read_text(encoding="utf-8")
    probe = workdir / ("checked-" + Path(page).name)
    probe.write_text(text.replace("</body>", checker + "</body>", 1) if "</body>" in text else text + checker,
                     encoding="utf-8")
    proc = subprocess.run([chromium(), "--headless=new", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           f"--window-size={WIDTH},{HEIGHT}", "--virtual-time-budget=5000",
                           f"--user-data-dir={workdir / 'chromium-profile'}", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=180)
    found = re.search(rf'<pre id="{VERDICT_ID}">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no verdict in chromium's DOM (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


needs_chromium = pytest.mark.skipif(chromium() is None, reason="no chromium binary (chromium, chromium-browser or "
                                    "google-chrome) on PATH: apt-get install -y chromium (.ci/run installs it)")


def _explain(verdict: dict) -> str:
    """Per kind of problem: how many, and the first three."""
    kinds: dict[str, list] = {}
    for p in verdict["problems"]:
        kinds.setdefault(p["kind"], []).append(p)
    return "\n".join(f"{kind}: {len(ps)}, e.g. {json.dumps(ps[:3])}" for kind, ps in kinds.items())


@needs_chromium
def test_checker_sees_a_broken_page(tmp_path):
    """A wide nowrap table (numbers pushed past the right edge), the same table in an overflow-hidden box, an image
    wider than the window with no max-width, and a table ranked against its bold column: each one is reported."""
    wide_png = tmp_path / "wide.png"
    from PIL import Image

    Image.new("RGB", (2400, 60), (200, 30, 30)).save(wide_png)
    numbers = "".join(f"<td>{i}.{i}5 &plusmn; 0.01</td>" for i in range(12))
    bad = tmp_path / "broken.html"
    bad.write_text(
        "<!DOCTYPE html><html><body style='margin:1em'>"
        "<table><tr><th>method</th><th>final</th>" + "<th>x</th>" * 12 + "</tr>"
        "<tr><td>a</td><td style='white-space:nowrap'>refused: " + "this method cannot train on it " * 8 + "</td>"
        + numbers + "</tr></table>"
        "<div style='overflow:hidden;width:300px'><table><tr>" + numbers + "</tr></table></div>"
        f"<img src='{wide_png.name}' alt='unbounded'>"
        "<table><tr><th>method</th><th>gain</th></tr><tr><td>a</td><td>+5.0</td></tr>"
        "<tr><td>b</td><td><b>+7.2</b></td></tr></table></body></html>", encoding="utf-8")
    v = check_page(bad, tmp_path)
    kinds = {p["kind"] for p in v["problems"]}
    assert v["innerWidth"] == WIDTH, v
    assert {"page scrolls sideways", "number cell", "image", "ranking"} <= kinds, _explain(v)
    assert any("outside the viewport" in p["why"] for p in v["problems"] if p["kind"] == "number cell")
    assert any("clipped" in p["why"] for p in v["problems"] if p["kind"] == "number cell")
    assert any("wider" in p["why"] for p in v["problems"] if p["kind"] == "image")
    # and it passes a page that is fine: a table that fits, a bounded image, rows in bold's order
    good = tmp_path / "fine.html"
    good.write_text(f"<!DOCTYPE html><html><body><img src='{wide_png.name}' alt='bounded' style='max-width:100%'>"
                    "<table><tr><th>method</th><th data-bold-column>gain</th></tr><tr><td>b</td><td><b>+7.2</b></td>"
                    "</tr><tr><td>a</td><td>+5.0</td></tr><tr><td>c</td><td>refused: no</td></tr></table>"
                    "</body></html>", encoding="utf-8")
    v = check_page(good, tmp_path)
    assert v["problems"] == [] and v["numbers"] == 2 and v["ranked"][0]["sorted"], _explain(v)


@needs_chromium
def test_leaderboard_page_reads_at_1400_px(tmp_path):
    v = check_page(LEADERBOARD, tmp_path)
    assert v["innerWidth"] == WIDTH and v["numbers"] > 100 and v["images"] >= 1, v
    assert v["problems"] == [], _explain(v)
    board = json.loads((LEADERBOARD.parent / "leaderboard.json").read_text())["board"]
    ranked = {r["column"] for r in v["ranked"]}
    assert len(v["ranked"]) == len(board["table"]) and ranked == {"gain (SE)"}, v["ranked"]  # every reward's table


def _cell(gain: float, final: float) -> dict:
    return {"seeds": 3, "planned": 3, "gain_in_se": gain, "beats_base": gain > 3, "final": final, "final_se": 0.01,
            "base": 0.17, "fidelity": 0.45, "fidelity_change": -0.05, "fidelity_change_in_se": -1.0,
            "kl_to_base": 5000.0, "images": 48.0, "unet_passes": 1728.0, "wall_time_s": 55.0, "reached": 3,
            "images_to_threshold": 48.0, "hacking": "", "diagnosis": "" if gain > 3 else "stayed flat"}


@needs_chromium
def test_leaderboard_writer_ranks_by_gain_and_keeps_refusals_out_of_the_numbers(tmp_path):
    """The page writer itself (not only the committed page): a bold +7.2 SE with a lower final reward ranks above a
    bold +5.0 SE; a refusal longer than the window sits in a row of its own and pushes no number off-screen."""
    from types import SimpleNamespace

    from bench.outputs.leaderboard_page import html_page

    methods = {m: {"tuned": "by hand"} for m in ("alignprop", "dde", "rlr", "ddpo")}
    p = SimpleNamespace(rewards=["saturation", "jpeg-incompressibility"], methods=methods, sigma=3.0)
    refusal = {"seeds": 0, "planned": 3, "refused": "method 'alignprop' backpropagates the reward, but reward "
               "'jpeg-incompressibility' is not differentiable; " + "use a differentiable reward " * 12}
    table = {"saturation": {"alignprop": _cell(7.2, 0.208), "dde": _cell(5.0, 0.235), "rlr": _cell(14.3, 0.203),
                            "ddpo": _cell(2.3, 0.192)},
             "jpeg-incompressibility": {"alignprop": refusal, "dde": _cell(1.0, 1.426), "rlr": dict(refusal),
                                        "ddpo": _cell(0.8, 1.416)}}
    overall = {m: {"rewards_run": 2, "beats_base_on": [], "hacking_on": [], "refused_on": [], "images": 48.0,
                   "wall_time_s": 55.0} for m in methods}
    page = tmp_path / "leaderboard.html"
    page.write_text(html_page(p, {"table": table, "overall": overall}, "# Leaderboard test\n\nsome text\n", None))
    v = check_page(page, tmp_path)
    assert v["problems"] == [], _explain(v)
    assert [r["values"] for r in v["ranked"]] == [[14.3, 7.2, 5.0, 2.3], [1.0, 0.8, None, None]], v["ranked"]
    text = page.read_text()
    assert text.index(">rlr<") < text.index(">alignprop<") < text.index(">dde<")  # by gain, not by final reward
    assert "colspan" in text and "Rank</b> (every table below): by the <b>gain in SE</b>" in text


@needs_chromium
def test_paper_report_reads_at_1400_px(tmp_path):
    v = check_page(REPORT, tmp_path, ranked=False)
    assert v["innerWidth"] == WIDTH and v["numbers"] > 100 and v["images"] >= 4, v
    assert v["problems"] == [], _explain(v)


if __name__ == "__main__":  # python tests/bench/test_pages.py PAGE.html [--unranked]: print its verdict
    if chromium() is None:
        sys.exit("no chromium on PATH")
    with tempfile.TemporaryDirectory() as tmp:
        verdict = check_page(sys.argv[1], tmp, ranked="--unranked" not in sys.argv)
    print(json.dumps(verdict, indent=1))
    sys.exit(1 if verdict["problems"] else 0)
