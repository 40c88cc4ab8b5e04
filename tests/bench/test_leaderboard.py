"""bench leaderboard: a 2-method, 2-reward, 1-seed, 2-step protocol killed in its second run and rerun finishes the
rest without rerunning the first; the tables' numbers are the runs' own (the paired gain recomputed here from the
per-image eval scores); a method the reward cannot train is shown refused; bad protocols are one line; and the
committed protocol plans every method x reward x seed."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from cli_capture import capture
from conftest import ROOT

from bench import cli
from bench.core import run
from bench.drivers import leaderboard, sweep
from methods import METHODS

pytestmark = pytest.mark.slow

PROTOCOL = """\
name: test-v1
version: 1
rewards: [saturation, jpeg-incompressibility]
seeds: [0]
budget_images: 4
set: [model={pipe}, eval_prompts={prompts}, checkpoint_every=1, eval.every=1000, eval.grid_every=1000,
      eval.num_seeds=2, eval.num_steps=2, sampler.num_steps=2, sampler.eta=1.0, threads=1,
      "eval.metrics=[saturation, jpeg-incompressibility, tiny-rating]"]
methods:
  alignprop:
    set: [steps=2, alignprop.batch_size=2, alignprop.truncation=full, alignprop.lr=0.05]
    tuned: by hand
  ddpo:
    set: [steps=2, ddpo.samples_per_step=2, ddpo.sample_batch_size=2, ddpo.train_batch_size=2, ddpo.grad_accum=1,
          ddpo.lr=0.01, ddpo.stat_min_count=2, ddpo.skip_first_steps=0, ddpo.skip_last_steps=0]
hacking: {{sigma: 3, watch: [fidelity, eval_tiny-rating_mean]}}
root: {root}
"""


@pytest.fixture(scope="module")
def board(small_pixel_pipeline_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaderboard")
    prompts = tmp / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    root = str(tmp / "root")
    path = tmp / "protocol.yaml"
    path.write_text(PROTOCOL.format(pipe=small_pixel_pipeline_dir, prompts=prompts, root=root))
    argv = ["leaderboard", "--protocol", str(path)]
    env = dict(os.environ, **{run.CRASH_ENV: "2", sweep.SWEEP_CRASH_RUN_ENV: "2"})
    killed = subprocess.run([sys.executable, "-m", "bench", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    p = leaderboard.load_protocol(str(path))
    planned = leaderboard.plan(p)
    after_kill = [sweep.status_of(r.run_dir) for r in planned]
    first = os.stat(os.path.join(planned[0].run_dir, "metrics.parquet")).st_mtime_ns
    resumed = capture(argv)
    again = capture(argv)
    return dict(p=p, planned=planned, killed=killed, after_kill=after_kill, first=first, resumed=resumed,
                again=again, root=root, argv=argv, path=str(path))


def test_killed_leaderboard_reruns_only_what_is_left(board):
    assert board["killed"].returncode == 137, board["killed"].stderr[-2000:]
    planned = board["planned"]  # seed-major: (saturation: alignprop, ddpo), (jpeg: alignprop, ddpo)
    assert [(r.reward, r.method) for r in planned] == [("saturation", "alignprop"), ("saturation", "ddpo"),
                                                        ("jpeg-incompressibility", "alignprop"),
                                                        ("jpeg-incompressibility", "ddpo")]
    assert board["after_kill"] == ["complete", "interrupted", "new", "new"]
    code, out = board["resumed"]
    assert code == 0, out
    last = {line.split(" ")[0]: line.split(": ")[1] for line in out.splitlines() if line.startswith("[")}
    assert list(last.values()) == ["complete, skipped", "interrupted, resuming", "refused", "running"], out
    assert os.stat(os.path.join(planned[0].run_dir, "metrics.parquet")).st_mtime_ns == board["first"]
    assert [sweep.status_of(r.run_dir) for r in planned] == ["complete", "complete", "new", "complete"]
    code, out = board["again"]  # a third pass runs nothing new
    assert code == 0 and out.count("complete, skipped") == 3 and "leaderboard test-v1: 3/4 runs complete" in out
    log = json.load(open(os.path.join(board["root"], "leaderboard.json")))
    # the killed driver's session has a start and no end; the two after it both
    assert [s["complete_before"] for s in log["sessions"]] == [0, 1, 3] and log["sessions"][0]["end"] is None
    assert log["sessions"][1]["complete_after"] == 3 and log["sessions"][2]["end"]
    assert log["protocol"]["hash"] == board["p"].digest
    assert log["sessions"][0]["machine"]["cpus"] == os.cpu_count()


def test_tables_hold_the_runs_own_numbers(board):
    p, planned = board["p"], board["planned"]
    b = leaderboard.build(p)
    for reward, method, run_dir in [(r.reward, r.method, r.run_dir) for r in planned if r.method != "alignprop"
                                    or r.reward == "saturation"]:
        e = b["table"][reward][method]
        df = pd.read_parquet(os.path.join(run_dir, "metrics.parquet"))
        assert e["final"] == pytest.approx(df["eval_reward_mean"].dropna().iloc[-1], rel=1e-12)
        s = pd.read_parquet(os.path.join(run_dir, "eval_samples.parquet")).sort_values(["step", "prompt", "seed"])
        before, after = (s[s["step"] == k]["reward"].to_numpy() for k in (0, 2))
        g = after - before
        assert e["gain"] == pytest.approx(g.mean(), rel=1e-9, abs=1e-12)
        assert e["gain_se"] == pytest.approx(g.std(ddof=1) / math.sqrt(len(g)), rel=1e-9)  # one seed: images only
        assert e["gain_in_se"] == pytest.approx(g.mean() / (g.std(ddof=1) / math.sqrt(len(g))), rel=1e-9)
        assert e["beats_base"] == (e["gain_in_se"] > 3) and e["images"] == df["images"].iloc[-1]
        assert e["unet_passes"] == df["unet_fwd"].iloc[-1] + df["unet_bwd"].iloc[-1]
    # the other reward, read from the run's held-out column: ddpo trained on saturation, scored on jpeg too
    sat = b["table"]["saturation"]
    assert {sat["alignprop"]["rank"], sat["ddpo"]["rank"]} == {1, 2}
    assert (sat["alignprop"]["rank"] == 1) == (sat["alignprop"]["final"] > sat["ddpo"]["final"])
    for e in (sat["alignprop"], sat["ddpo"]):  # a method without a 3-SE gain gets its measured line
        assert e["beats_base"] or ("training batches' reward" in e["diagnosis"] and "KL to base" in e["diagnosis"])
    assert b["table"]["jpeg-incompressibility"]["alignprop"]["seeds"] == 0
    assert "not differentiable" in b["table"]["jpeg-incompressibility"]["alignprop"]["refused"]
    assert b["overall"]["alignprop"]["refused_on"] == ["jpeg-incompressibility"]
    md = open(os.path.join(board["root"], "leaderboard.md")).read()
    assert "## saturation" in md and "## jpeg-incompressibility" in md and "## Overall" in md
    assert "refused: method 'alignprop' backpropagates the reward" in md and "3 of 4 runs complete" in md
    assert f"{sat['ddpo']['final']:.4g}" in md
    assert os.path.getsize(os.path.join(board["root"], "gains.png")) > 1000
    page = open(os.path.join(board["root"], "leaderboard.html")).read()
    assert page.count("<table>") == 3 and "data:image/png;base64," in page and "<h2>saturation</h2>" in page


def test_hacking_flag_follows_its_rule(board):
    p = board["p"]
    row = {"gain_in_se": 5.0, "fidelity_change_in_se": -3.5, "tiny-rating_change_in_se": -1.0}
    runs = [type("R", (), {"method": "ddpo"})()]
    assert leaderboard._hacking(p, row, runs, "saturation") == "fidelity -3.5 SE"
    assert leaderboard._hacking(p, dict(row, fidelity_change_in_se=-2.9), runs, "saturation") == ""
    assert leaderboard._hacking(p, dict(row, gain_in_se=2.0), runs, "saturation") == ""
    assert leaderboard._hacking(p, {**row, "tiny-rating_change_in_se": -4.0}, runs,
                                "saturation") == "fidelity -3.5 SE, tiny-rating -4.0 SE"


def test_paired_se_adds_seed_and_image_terms():
    rng = np.random.default_rng(0)
    g = rng.normal(0.3, 1.0, size=(3, 40)) + rng.normal(0, 0.5, size=(3, 1))
    expected = math.sqrt(g.mean(axis=1).var(ddof=1) / 3 + g.mean(axis=0).var(ddof=1) / 40)
    assert leaderboard.paired_se(g) == pytest.approx(expected, rel=1e-12)
    assert leaderboard.paired_se(g[:1]) == pytest.approx(g[0].std(ddof=1) / math.sqrt(40), rel=1e-12)


def test_bad_protocol_is_one_line(board, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\nrewards: [saturation]\nmethods: {alignprop: {}}\nbudget: 3\n")
    for argv, expected in [
        (["leaderboard", "--protocol", str(tmp_path / "none.yaml")], "does not exist; accepted: a YAML file"),
        (["leaderboard", "--protocol", str(bad)], "has keys ['budget', 'methods', 'name', 'rewards', 'version']; "
                                                  "accepted: budget_images, budgets, gold, hacking"),
        (["leaderboard", "--protocol", board["path"], "--executor", "slurm"], "executor 'slurm'; accepted: local, ray"),
    ]:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], err


def test_committed_protocol_plans_every_method_reward_and_seed():
    p = leaderboard.load_protocol(leaderboard.DEFAULT_PROTOCOL)
    assert (p.name, p.version, p.seeds, len(p.rewards)) == ("tiny-v1", 1, [0, 1, 2], 4)
    # a published protocol is never edited: it plans every method registered when it was published (2026-12-05);
    # methods registered since (rwr, the four GRPO variants, diffusion-nft) wait for the next protocol
    assert set(p.methods) == set(METHODS) - {"rwr", "flow-grpo", "flow-grpo-fast", "dance-grpo", "mix-grpo",
                                             "diffusion-nft"}
    runs = leaderboard.plan(p)
    free = [m for m in p.methods if p.methods[m].get("reward_free")]
    assert free == ["ogdm"] and len(runs) == 3 * (4 * (len(p.methods) - 1) + 1)
    for r in runs:  # one evaluation for all: every run scores every protocol reward
        assert set(p.rewards) <= set(r.cfg["eval"]["metrics"]) and r.cfg["threads"] == 1
