"""Comparison outputs: a sweep killed mid-way resumes without rerunning finished runs; curves, the
side-by-side grid, paper tables (LaTeX escaping) and the HTML report in a real headless browser."""
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from cli_capture import capture
from conftest import ROOT
from PIL import Image

from bench import cli
from bench.core import run
from bench.drivers import sweep
from bench.outputs import compare, table
from bench.outputs.plots import CELL, GAP, LABEL_W, read_grid_cells

pytestmark = pytest.mark.slow  # every test here reads the sweep that the module's fixture runs


def small_sweep_args(pipe_dir, prompts_file):
    return [f"model={pipe_dir}", f"eval_prompts={prompts_file}", "steps=4", "checkpoint_every=2", "eval.every=2",
            "eval.grid_every=2", "eval.num_seeds=2", "eval.num_steps=2", "sampler.num_steps=2", "sampler.eta=1.0",
            "threads=1", "alignprop.batch_size=2", "alignprop.truncation=full", "alignprop.lr=0.05",
            "ddpo.samples_per_step=4", "ddpo.sample_batch_size=2", "ddpo.train_batch_size=2", "ddpo.grad_accum=1",
            "ddpo.lr=0.01", "ddpo.stat_min_count=2",
            "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0"]  # every step of the 2-step sampler


def _mtimes(run_dir):
    names = ("manifest.json", "metrics.parquet", "summary.json")
    return {f: os.stat(os.path.join(run_dir, f)).st_mtime_ns for f in names}


@pytest.fixture(scope="module")
def swept(small_pixel_pipeline_dir, tmp_path_factory):
    """alignprop and ddpo x seeds 0, 1 on the small pipeline; the sweep is killed in its 2nd run, then rerun."""
    tmp = tmp_path_factory.mktemp("sweep")
    prompts = tmp / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    root = str(tmp / "root")
    argv = ["sweep", "--methods", "alignprop", "ddpo", "--seeds", "0", "1", "--reward", "saturation", "--root", root,
            "--set"] + small_sweep_args(small_pixel_pipeline_dir, prompts)
    env = dict(os.environ, **{run.CRASH_ENV: "3", sweep.SWEEP_CRASH_RUN_ENV: "2"})
    killed = subprocess.run([sys.executable, "-m", "bench"] + argv, cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    index = json.load(open(os.path.join(root, "sweep.json")))["runs"]
    dirs = {(r["method"], r["seed"]): os.path.join(root, r["dir"]) for r in index}
    after_kill = {k: sweep.status_of(d) for k, d in dirs.items()}
    first_mtimes = _mtimes(dirs[("alignprop", 0)])
    resumed = capture(argv)
    again = capture(argv)
    return dict(root=root, dirs=dirs, killed=killed, after_kill=after_kill, first_mtimes=first_mtimes,
                resumed=resumed, again=again, argv=argv, prompts=str(prompts))


def test_interrupted_sweep_resumes_without_rerunning_finished_runs(swept):
    assert swept["killed"].returncode == 137, swept["killed"].stderr[-2000:]
    assert swept["after_kill"] == {("alignprop", 0): "complete", ("alignprop", 1): "interrupted",
                                   ("ddpo", 0): "new", ("ddpo", 1): "new"}
    code, out = swept["resumed"]
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split(": ")[-1] for line in lines] == ["complete, skipped", "interrupted, resuming", "running",
                                                        "running"]
    dirs = swept["dirs"]
    assert _mtimes(dirs[("alignprop", 0)]) == swept["first_mtimes"]  # the finished run was not touched
    manifest = json.load(open(os.path.join(dirs[("alignprop", 1)], "manifest.json")))
    assert manifest["status"] == "complete" and [r["from_step"] for r in manifest["resumes"]] == [2]
    for key in (("ddpo", 0), ("ddpo", 1)):
        m = json.load(open(os.path.join(dirs[key], "manifest.json")))
        assert m["status"] == "complete" and "resumes" not in m
        assert pd.read_parquet(os.path.join(dirs[key], "metrics.parquet"))["step"].tolist() == [0, 1, 2, 3, 4]
    code, out = swept["again"]  # a third pass runs nothing
    assert code == 0 and out.count("complete, skipped") == 4 and "sweep: 4/4 runs complete" in out
    # identity = hash of the resolved config: a changed override is another run, the same one is not
    args = small_sweep_args("m", "p")
    a = sweep.plan(["alignprop"], [0], ["saturation"], args, "r")[0]
    b = sweep.plan(["alignprop"], [0], ["saturation"], args, "r")[0]
    c = sweep.plan(["alignprop"], [0], ["saturation"], args + ["alignprop.lr=0.02"], "r")[0]
    assert a.run_dir == b.run_dir != c.run_dir and a.run_id != c.run_id
    # a method's own section applies to that method only
    d = sweep.plan(["ddpo"], [0], [], args + ["alignprop.lr=0.02"], "r")[0]
    assert d.cfg["ddpo"]["lr"] == 0.01 and "alignprop" not in d.cfg


def test_sweep_bad_input_is_one_line(swept, capsys):
    for argv, expected in [
        (["sweep", "--methods", "dpo", "--root", swept["root"]], "unknown method 'dpo'; accepted:"),
        (["sweep", "--root", swept["root"]], "a sweep needs --methods"),
        (["sweep", "--methods", "alignprop", "--set", "alignprop.lrr=1", "--root", swept["root"]],
         "unknown config key 'alignprop.lrr'"),
        (["sweep", "--file", os.path.join(swept["root"], "nope.yaml")], "sweep file"),
    ]:
        assert cli.main(argv) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and expected in err[0], (argv, err)


def test_sweep_file_gives_the_same_runs(swept, tmp_path):
    spec = tmp_path / "sweep.yaml"
    args = swept["argv"][swept["argv"].index("--set") + 1:]
    spec.write_text(json.dumps({"methods": ["alignprop", "ddpo"], "seeds": [0, 1], "reward": "saturation",
                                "set": args, "root": swept["root"]}))
    code, out = capture(["sweep", "--file", str(spec)])
    assert code == 0 and out.count("complete, skipped") == 4


def test_curves_one_figure_per_metric_png_and_svg(swept, tmp_path):
    runs = compare.select_runs([swept["root"]])
    assert len(runs) == 4
    # the mean and standard error over seeds, by hand
    members = [r for r in runs if r.method == "alignprop"]
    xs, mean, se, n = compare.mean_curve(members, "eval_reward_mean", "unet_passes")
    finals = [r.df["eval_reward_mean"].dropna().iloc[-1] for r in members]
    assert n == 2 and mean[-1] == pytest.approx(np.mean(finals))
    assert se[-1] == pytest.approx(np.std(finals, ddof=1) / 2 ** 0.5)
    passes = members[0].df["unet_fwd"] + members[0].df["unet_bwd"]
    assert xs[-1] == passes.iloc[-1] > 0
    out = tmp_path / "curves"
    assert cli.main(["compare", swept["root"], "--metric", "eval_reward_mean", "--metric", "kl_to_base",
                     "--x", "unet_passes", "--out-dir", str(out)]) == 0
    names = sorted(os.listdir(out))
    assert names == ["eval_reward_mean__unet_passes.png", "eval_reward_mean__unet_passes.svg",
                     "kl_to_base__unet_passes.png", "kl_to_base__unet_passes.svg"]
    png = Image.open(out / names[0])
    assert png.size[0] == pytest.approx(3.3 * 300, abs=2)  # paper column width at 300 dpi
    svg = (out / names[1]).read_text()
    assert "alignprop (n=2)" in svg and "ddpo (n=2)" in svg
    # selection by method
    assert {r.method for r in compare.select_runs([swept["root"]], methods=["ddpo"])} == {"ddpo"}


def test_side_by_side_grid_rows_are_base_and_methods(swept, tmp_path):
    runs = compare.select_runs([swept["root"]])
    out = str(tmp_path / "grid.png")
    assert cli.main(["compare", swept["root"], "--grid", out, "--grid-step", "2"]) == 0
    img = Image.open(out).convert("RGB")

    assert img.width == LABEL_W + 2 * (CELL + GAP)  # two eval prompts, eval seed 0
    head = img.height - 3 * (CELL + GAP)  # rows: base model, alignprop, ddpo
    assert 0 < head < CELL
    # the base row is the step-0 sample of (prompt 0, seed 0); the alignprop row its step-2 sample
    a0 = min((r for r in runs if r.method == "alignprop"), key=lambda r: r.seed)
    base = read_grid_cells(os.path.join(a0.path, "grids", "step_000000.png"))[0][0]
    step2 = read_grid_cells(os.path.join(a0.path, "grids", "step_000002.png"))[0][0]
    cell = lambda row: np.asarray(img.crop((LABEL_W, head + row * (CELL + GAP), LABEL_W + CELL,  # noqa: E731
                                            head + row * (CELL + GAP) + CELL)))
    assert np.array_equal(cell(0), np.asarray(base)) and np.array_equal(cell(1), np.asarray(step2))
    assert not np.array_equal(cell(0), cell(1))
    code = cli.main(["compare", swept["root"], "--grid", out, "--grid-step", "3"])
    assert code == 2  # step 3 has no saved grid: the error names the steps that have one


def test_table_numbers_bold_and_formats(swept, tmp_path):
    runs = compare.select_runs([swept["root"]])
    stem = str(tmp_path / "t")
    assert cli.main(["table", swept["root"], "--out", stem, "--threshold=-1e9"]) == 0
    csv = pd.read_csv(stem + ".csv")
    assert list(csv["method"]) == ["alignprop", "ddpo"] and list(csv["seeds"]) == [2, 2]
    for method, row in csv.set_index("method").iterrows():
        finals = [r.df["eval_reward_mean"].dropna().iloc[-1] for r in runs if r.method == method]
        assert row["eval_reward_mean"] == pytest.approx(np.mean(finals))
        assert row["eval_reward_mean_se"] == pytest.approx(np.std(finals, ddof=1) / 2 ** 0.5)
        assert row["images_to_threshold"] == 0  # the threshold is met at step 0
        one = [r for r in runs if r.method == method][0].df
        assert row["unet_passes_per_step"] == pytest.approx((one["unet_fwd"].iloc[-1] + one["unet_bwd"].iloc[-1]) / 4)
    md = open(stem + ".md").read()
    best = csv.set_index("method")["eval_reward_mean"].idxmax()
    best_line = [line for line in md.splitlines() if line.startswith(f"| {best} |")][0]
    assert best_line.split(" | ")[4].startswith("**")  # the best eval reward is bold
    tex = open(stem + ".tex").read()
    assert r"\toprule" in tex and r"\midrule" in tex and r"\bottomrule" in tex and r"\textbf{" in tex
    assert "$\\pm$" in tex


def test_latex_escapes_special_characters_in_names(swept, tmp_path):
    assert table.latex_escape(r"a&b%c$d#e_f{g}h~i^j\k") == (r"a\&b\%c\$d\#e\_f\{g\}h\textasciitilde{}i"
                                                           r"\textasciicircum{}j\textbackslash{}k")
    runs = compare.select_runs([swept["root"]])
    renamed = []
    for r in runs:
        cfg = dict(r.cfg, method="my_method&co" if r.method == "alignprop" else "50%_ddpo",
                   reward="sat#1 {x}", eval_prompts="p~q^r\\s")
        renamed.append(dataclasses.replace(r, cfg=cfg))
    stem = str(tmp_path / "esc")
    table.write(renamed, stem)
    tex = open(stem + ".tex").read()
    assert r"my\_method\&co" in tex and r"50\%\_ddpo" in tex and r"sat\#1 \{x\}" in tex
    assert r"p\textasciitilde{}q\textasciicircum{}r\textbackslash{}s" in tex
    body = tex.split(r"\midrule")[1]  # no raw special character survives in the rows
    assert not re.search(r"(?<!\\)[&%#_]", body.replace(" & ", " ").replace("$\\pm$", ""))
    assert "my_method&co" in open(stem + ".md").read()  # Markdown keeps the names as they are


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


# Run in the page once it has loaded: how many images loaded, and how many table cells wrap onto a second line
# (the cell's text has line boxes at more than one height).
PROBE = ("<script>window.addEventListener('load',()=>{const b=document.body;"
         "b.setAttribute('data-loaded',[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length+'/'"
         "+document.images.length);"
         "const cells=[...document.querySelectorAll('td,th')];"
         "const wrapped=cells.filter(c=>{const r=document.createRange();r.selectNodeContents(c);"
         "return new Set([...r.getClientRects()].map(x=>Math.round(x.top))).size>1});"
         "b.setAttribute('data-wrapped',wrapped.length+'/'+cells.length)})</script>")


def load_in_browser(page: str, tmp_path) -> tuple[str, list[str], str]:
    """Load a copy of ``page`` in headless chromium (a 1280 x 900 window); returns (data-loaded 'ok/total' images,
    console lines, 'wrapped/total' table cells)."""
    probe = tmp_path / ("probe-" + os.path.basename(page))
    text = open(page, encoding="utf-8").read()
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", "--virtual-time-budget=5000", "--window-size=1280,900",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    loaded = re.search(r'data-loaded="(\d+/\d+)"', proc.stdout)
    wrapped = re.search(r'data-wrapped="(\d+/\d+)"', proc.stdout)
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return (loaded.group(1) if loaded else ""), console, (wrapped.group(1) if wrapped else "")


def test_html_report_is_self_contained_and_loads_in_headless_chromium(swept, tmp_path):
    page = str(tmp_path / "report.html")
    assert cli.main(["report", swept["root"], "--out", page]) == 0
    html = open(page, encoding="utf-8").read()
    srcs = re.findall(r'<img src="([^"]*)"', html)
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"(src|href)=[\"']?(https?:)?//", html) and "<script" not in html
    assert "alignprop" in html and "lr: 0.05" in html  # run configs are there
    for d in swept["dirs"].values():  # links to run folders, relative to the page
        assert f'href="{os.path.relpath(d, tmp_path)}/"' in html
    if _chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; .ci/run installs it)")
    loaded, console, wrapped = load_in_browser(page, tmp_path)
    assert loaded == f"{len(srcs)}/{len(srcs)}" and console == [], (loaded, console)
    cells = html.count("<td>") + html.count("<th>")
    assert wrapped == f"0/{cells}", wrapped  # the table takes the page's width: no number wraps
    # the probe itself sees failures: a missing image, a console error, a cell squeezed onto two lines
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><img src='missing.png'><script>console.error('boom')</script>"
                   "<table style='width:4em'><tr><td>6.906 ± 0.082</td><td>1</td></tr></table></body></html>")
    loaded, console, wrapped = load_in_browser(str(bad), tmp_path)
    assert loaded == "0/1" and any("boom" in line for line in console) and wrapped == "1/2"
