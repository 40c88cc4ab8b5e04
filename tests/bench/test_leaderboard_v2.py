"""Leaderboard version 2: a 2-method, 2-reward protocol with budgets and equal tuning, killed in its second tuning run
and rerun, finishes the rest (its tuning included) without rerunning what was done; the rule picks the best tuning
configuration from the runs' own numbers and freezes it; every run is evaluated at the budgets; the pages put the
curves first.  The over-optimisation flag, the area and the extrapolated crossing against hand computations on planted
curves; the committed protocols cover every registered method with equal searches."""
import datetime
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from cli_capture import capture
from conftest import ROOT
from test_pages import _explain, check_page, chromium

from bench import cli
from bench.core import run
from bench.drivers import leaderboard, sweep
from bench.outputs import budgets
from bench.outputs.compare import RunData
from methods import METHODS

PROTOCOL = """\
name: test-v2
version: 2
rewards: [saturation, tiny-aesthetic]
seeds: [0]
budgets: [2, 4, 8]
tuning: {{reward: saturation, seed: 7, eval_first_seed: 50}}
gold: {{tiny-aesthetic: tiny-rating}}
set: [model={pipe}, eval_prompts={prompts}, checkpoint_every=1, eval.every=1000, eval.grid_every=1000,
      eval.num_seeds=2, eval.num_steps=2, sampler.num_steps=2, sampler.eta=1.0, threads=1, eval.kl_seeds=1,
      "eval.metrics=[saturation, tiny-aesthetic, tiny-rating]"]
methods:
  alignprop:
    images_per_step: 2
    set: [alignprop.batch_size=2, alignprop.truncation=full]
    search: [[alignprop.lr=0.05], [alignprop.lr=0.001]]
  ddpo:
    images_per_step: 2
    set: [ddpo.samples_per_step=2, ddpo.sample_batch_size=2, ddpo.train_batch_size=2, ddpo.grad_accum=1,
          ddpo.stat_min_count=2, ddpo.skip_first_steps=0, ddpo.skip_last_steps=0]
    search: [[ddpo.lr=0.01], [ddpo.lr=0.001]]
hacking: {{sigma: 3, watch: [fidelity]}}
root: {root}
"""


@pytest.fixture(scope="module")
def board(small_pixel_pipeline_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaderboard_v2")
    prompts = tmp / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    root = str(tmp / "root")
    path = tmp / "protocol.yaml"
    path.write_text(PROTOCOL.format(pipe=small_pixel_pipeline_dir, prompts=prompts, root=root))
    argv = ["leaderboard", "--protocol", str(path)]
    env = dict(os.environ, **{run.CRASH_ENV: "2", sweep.SWEEP_CRASH_RUN_ENV: "2"})
    killed = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    p = leaderboard.load_protocol(str(path))
    tuning = leaderboard.plan_tuning(p)
    after_kill = [sweep.status_of(r.run_dir) for r in tuning]
    planned_after_kill = leaderboard.plan(p)
    first = os.stat(os.path.join(tuning[0].run_dir, "metrics.parquet")).st_mtime_ns
    resumed = capture(argv)
    return dict(p=p, tuning=tuning, killed=killed, after_kill=after_kill, planned_after_kill=planned_after_kill,
                first=first, resumed=resumed, root=root, path=str(path))


@pytest.mark.slow
def test_killed_v2_leaderboard_reruns_only_what_is_left_tuning_included(board):
    assert board["killed"].returncode == 137, board["killed"].stderr[-2000:]
    assert board["after_kill"] == ["complete", "interrupted", "new", "new"]  # alignprop x 2 configs, ddpo x 2
    # while alignprop's tuning is unfinished, no evaluation run of it (nor of ddpo) can be planned
    assert len(board["planned_after_kill"]) == 4
    code, out = board["resumed"]
    assert code == 0, out
    tuning = board["tuning"]
    assert all(sweep.status_of(r.run_dir) == "complete" for r in tuning)
    assert os.stat(os.path.join(tuning[0].run_dir, "metrics.parquet")).st_mtime_ns == board["first"]
    assert "interrupted, resuming" in out and "complete, skipped" in out
    p = board["p"]
    every = leaderboard.plan(p)
    assert len(every) == 4 + 4  # the tuning, then 2 methods x 2 rewards x 1 seed
    assert all(sweep.status_of(r.run_dir) == "complete" for r in every)
    assert "test-v2: 4/4 runs complete" in out


@pytest.mark.slow
def test_tuning_rule_picks_the_best_final_reward_and_freezes_it(board):
    p = board["p"]
    for method in p.methods:
        runs = [r for r in board["tuning"] if r.method == method]
        finals = [RunData.read(r.run_dir).df["eval_reward_mean"].dropna().iloc[-1] for r in runs]
        for r in runs:  # the tuning runs use the tuning seed and eval noise, never an evaluation seed's
            cfg = RunData.read(r.run_dir).cfg
            assert cfg["seed"] == 7 and cfg["eval"]["first_seed"] == 50 and cfg["reward"] == "saturation"
            seeds = set(pd.read_parquet(os.path.join(r.run_dir, "eval_samples.parquet"))["seed"])
            assert seeds == {50, 51}
        choice = leaderboard.tuning_choice(p, method)
        assert choice["index"] == int(np.argmax(finals)) and choice["scores"] == pytest.approx(finals)
        chosen = p.methods[method]["search"][choice["index"]]
        for r in leaderboard.evaluation_runs(p, leaderboard.plan(p)):
            if r.method == method:
                section = RunData.read(r.run_dir).cfg[method.replace("-", "_")]
                for line in chosen:  # the frozen configuration's setting is the evaluation run's
                    key, value = line.split("=")
                    assert section[key.split(".")[1]] == float(value)


@pytest.mark.slow
def test_every_run_is_evaluated_at_the_budgets_and_the_pages_show_curves_first(board):
    p = board["p"]
    for r in leaderboard.evaluation_runs(p, leaderboard.plan(p)):
        d = RunData.read(r.run_dir).df
        evals = d.dropna(subset=["eval_reward_mean"])
        assert evals["step"].tolist() == [0, 1, 2, 4] and evals["images"].tolist()[1:] == [2, 4, 8]
    b = leaderboard.build(p)
    cur = b["budgets"]["curves"]["tiny-aesthetic"]["ddpo"]
    assert [q["images"] for q in cur["points"]] == [0, 2, 4, 8]
    run_dir = next(r.run_dir for r in leaderboard.plan(p) if r.method == "ddpo" and r.reward == "tiny-aesthetic"
                   and os.path.dirname(r.run_dir) == p.root)
    s = pd.read_parquet(os.path.join(run_dir, "eval_samples.parquet")).sort_values(["step", "prompt", "seed"])
    g = s[s["step"] == 4]["reward"].to_numpy() - s[s["step"] == 0]["reward"].to_numpy()
    assert cur["points"][-1]["gain"] == pytest.approx(g.mean())
    assert cur["points"][-1]["gain_se"] == pytest.approx(g.std(ddof=1) / math.sqrt(len(g)))
    assert "ddpo" in b["budgets"]["overopt"]["tiny-aesthetic"]
    code, out = capture(["leaderboard", "--protocol", board["path"], "--tables-only"])
    assert code == 0, out
    md = open(os.path.join(board["root"], "leaderboard.md")).read()
    order = [md.index(h) for h in ("## Budget curves", "## Proxy against gold", "## Eval reward at each budget",
                                   "## Tuning", "## Transfer", "## At the largest budget")]
    assert order == sorted(order)
    for name in ("budget_curves.png", "overopt.png", "leaderboard.html"):
        assert os.path.getsize(os.path.join(board["root"], name)) > 1000
    page = open(os.path.join(board["root"], "leaderboard.html")).read()
    assert page.index("data:image/png") < page.index("<h2>Tuning</h2>") < page.index("<h2>saturation</h2>")
    if chromium() is not None:  # read at 1400 px in a real headless browser, as the committed pages are
        v = check_page(os.path.join(board["root"], "leaderboard.html"), board["root"])
        assert v["problems"] == [] and v["images"] >= 3, _explain(v)


# ---- the rules on planted curves ------------------------------------------------------------------------------

def _planted(proxy_by_step: list[list[float]], gold_by_step: list[list[float]], kl: list[float]):
    """One run: per evaluation (steps 0, 1, 2, ...) its images' proxy and gold values; the metrics' KL."""
    rows = []
    for step, (pv, gv) in enumerate(zip(proxy_by_step, gold_by_step)):
        for i, (a, b) in enumerate(zip(pv, gv)):
            rows.append({"step": step, "prompt": f"p{i % 2}", "seed": i // 2, "reward": a, "gold": b})
    metrics = pd.DataFrame({"step": range(len(kl)), "kl_to_base": kl, "images": [0, 2, 4, 8][:len(kl)],
                            "reward_queries": 0, "unet_fwd": 0, "unet_bwd": 0, "wall_time": 1.0})
    return pd.DataFrame(rows), metrics


def test_overoptimisation_flag_follows_its_rule():
    rng = np.random.default_rng(0)
    noise = lambda: rng.normal(0, 0.05, 16)  # noqa: E731
    base = np.zeros(16)
    # proxy climbs all the way; gold climbs to the second evaluation, then falls far below it
    s, m = _planted([base, base + 1 + noise(), base + 2 + noise(), base + 3 + noise()],
                    [base, base + 0.5 + noise(), base + 1 + noise(), base - 0.5 + noise()], [0, 0.1, 0.2, 0.4])
    o = budgets.overoptimisation([s], [m], "reward", "gold", 3)
    assert o["peak"] == 2 and o["flag"]
    g = s[s["step"] == 3].sort_values(["prompt", "seed"])["gold"].to_numpy() - \
        s[s["step"] == 2].sort_values(["prompt", "seed"])["gold"].to_numpy()
    assert o["drop"][0] == pytest.approx(g.mean()) and o["drop"][1] == pytest.approx(g.std(ddof=1) / 4)
    assert [q["kl"] for q in o["points"]] == [0, 0.1, 0.2, 0.4]
    # the same gold with the proxy falling too: not over-optimisation of the proxy
    s2, m2 = _planted([base, base + 1 + noise(), base + 2 + noise(), base + 1 + noise()],
                      [base, base + 0.5 + noise(), base + 1 + noise(), base - 0.5 + noise()], [0, 0.1, 0.2, 0.4])
    assert not budgets.overoptimisation([s2], [m2], "reward", "gold", 3)["flag"]
    # gold falls from its peak by less than 3 SE: no flag
    wide = rng.normal(0, 1.0, 16)
    s3, m3 = _planted([base, base + 1, base + 2, base + 3], [base, base + 0.5, base + 0.6, base + 0.6 - 0.1 + wide],
                      [0, 0.1, 0.2, 0.4])
    o3 = budgets.overoptimisation([s3], [m3], "reward", "gold", 3)
    assert o3["peak"] in (2, 3) and not o3["flag"]
    # gold best at the last evaluation: nothing to flag
    s4, m4 = _planted([base, base + 1, base + 2], [base, base + 1, base + 2], [0, 0.1, 0.2])
    assert budgets.overoptimisation([s4], [m4], "reward", "gold", 3)["why"] == "gold highest at the largest budget"


def test_area_and_extrapolated_crossing_by_hand():
    pts = [{"gain": 0.0, "gain_in_se": 0.0, "images": 0}, {"gain": 1.0, "gain_in_se": 1.0, "images": 16},
           {"gain": 2.0, "gain_in_se": 1.5, "images": 32}, {"gain": 4.0, "gain_in_se": 2.0, "images": 64}]
    # trapezoids on log2 16, 32, 64: (1 + 2) / 2 * 1 + (2 + 4) / 2 * 1, over a width of 2
    assert budgets.area(pts, [16, 32, 64]) == pytest.approx((1.5 + 3.0) / 2)
    # gain in SE = 1 + 0.5 (log2 x - 4): 3 SE at log2 x = 8
    assert budgets.crossing(pts, 3) == pytest.approx(256)
    falling = [dict(q, gain_in_se=-q["gain_in_se"]) for q in pts]
    assert budgets.crossing(falling, 3) is None


def test_busy_wall_time_is_the_union_of_the_runs_spans(monkeypatch):
    # two drivers side by side: runs a [0, 100] and b [50, 150] overlap, c [200, 230] after a gap; a run with no end
    # time (never completed) adds nothing.  Union: 150 + 30 = 180 s (the sum of the run wall times would be 230).
    spans = {"a": (100, 100.0), "b": (150, 100.0), "c": (230, 30.0), "d": (None, 40.0)}
    t0 = 1_800_000_000

    def read(d):
        end, wall = spans[d]
        iso = None if end is None else datetime.datetime.fromtimestamp(t0 + end, datetime.timezone.utc).isoformat()
        return SimpleNamespace(manifest={"end_time": iso}, df=pd.DataFrame({"wall_time": [1.0, wall]}))

    monkeypatch.setattr(leaderboard.RunData, "read", staticmethod(read))
    assert leaderboard._busy_wall_s(list(spans)) == pytest.approx(180.0)
    assert leaderboard._busy_wall_s(["c", "a"]) == pytest.approx(130.0)


def test_committed_v2_protocols_cover_every_method_with_equal_searches():
    for name, world_rewards in (("tiny-v2", None), ("tiny-flow-v2", "tiny-geneval")):
        p = leaderboard.load_protocol(os.path.join(ROOT, "bench", "protocols", f"{name}.yaml"))
        assert set(p.methods) == set(METHODS)  # every registered method
        assert p.budgets[-1] >= 8 * p.budgets[0] and len(p.budgets) >= 3
        assert {len(spec["search"]) for spec in p.methods.values()} == {6} and p.tuning["rule"] == "best-final"
        assert p.tuning["seed"] not in p.seeds and p.tuning["eval_first_seed"] >= 8  # no evaluation noise seed
        assert all(len(set(map(tuple, spec["search"]))) == 6 for spec in p.methods.values())
        for m in p.methods:
            assert len(leaderboard.budget_steps(p, m)) == len(p.budgets)
        if world_rewards:
            assert world_rewards in p.rewards and p.gold[world_rewards] == "fidelity"
        assert len(p.rewards) >= 2 and p.gold["tiny-aesthetic"] == "tiny-rating"


def test_bad_v2_protocol_is_one_line(tmp_path, capsys):
    base = open(os.path.join(ROOT, "bench", "protocols", "tiny-v2.yaml")).read()
    cases = [(base.replace("budgets: [16, 32, 64, 128]", "budgets: [64, 16]"), "increasing positive integers"),
             (base.replace("seed: 1000,", "seed: 1,"), "is an evaluation seed"),
             (base.replace("eval_first_seed: 1000", "eval_first_seed: 4"), "evaluation's noise seeds 0..7"),
             (base.replace("rule: best-final", "rule: best-mean"), "best-final"),
             (base.replace("    search: [[], [rwr.lr=3e-4], [rwr.lr=3e-3], [rwr.weighting=exponential],\n",
                           "    search: [[],\n"), "the same number of configurations")]
    for text, expected in cases:
        path = tmp_path / "p.yaml"
        path.write_text(text)
        assert cli.main(["leaderboard", "--protocol", str(path), "--tables-only"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err
