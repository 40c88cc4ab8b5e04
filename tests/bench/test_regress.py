"""CI regression of reward curves: a baseline over seeds with its band; a deliberately broken method
(AlignProp's loss sign flipped, monkeypatched here, methods/ untouched) fails naming method and metric;
NaN is caught; the unbroken code passes; the KL band on log values."""
import contextlib
import io
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest

import methods.alignprop as alignprop
from bench import cli
from bench.drivers import regress
from diffalign.errors import BenchError


@pytest.fixture(scope="module")
def baselines(small_pixel_pipeline_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regress")
    prompts = tmp / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    small = [f"model={small_pixel_pipeline_dir}", f"eval_prompts={prompts}", "reward=saturation", "eval.num_steps=2",
             "sampler.num_steps=2",
             "alignprop.batch_size=2", "alignprop.truncation=full", "alignprop.lr=0.05"]
    directory = str(tmp / "baselines")
    code, out = run_cli(["regress", "--update", "--methods", "alignprop", "--seeds", "0", "1", "2",
                         "--baselines", directory, "--set"] + small)
    assert code == 0, out
    return directory, str(tmp / "plots")


def run_cli(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = cli.main(argv)
    return code, buf.getvalue()


@pytest.mark.slow
def test_baseline_holds_curves_over_seeds_and_the_band_rule(baselines):
    directory, _ = baselines
    base = json.load(open(os.path.join(directory, "alignprop.json")))
    assert base["seeds"] == [0, 1, 2] and "steps=4" in base["overrides"] and base["variant"] == "alignprop/full"
    c = base["curves"]["eval_reward_mean"]
    assert c["step"] == [0, 2, 4] and len(c["per_seed"]) == 3
    per_seed = np.array(c["per_seed"])
    assert np.ptp(per_seed[:, 0]) < 1e-6  # step 0 is the base model for every seed
    mean, std = per_seed.mean(0), per_seed.std(0, ddof=1)
    half = np.maximum.reduce([3 * std, np.full(3, 1e-3), 0.02 * np.abs(mean)])
    assert np.allclose(c["lower"], mean - half) and np.allclose(c["upper"], mean + half)
    assert base["curves"]["fidelity"]["upper"][0] - base["curves"]["fidelity"]["mean"][0] == pytest.approx(1.01 / 4)
    assert "reward_mean" in base["finite"] and 0 not in base["finite"]["reward_mean"]


@pytest.mark.slow
def test_unbroken_code_passes(baselines):
    directory, plots = baselines
    code, out = run_cli(["regress", "--baselines", directory, "--out", plots])
    assert code == 0, out
    assert "regress: alignprop ok" in out and os.path.getsize(os.path.join(plots, "alignprop.png")) > 1000


@pytest.mark.slow
def test_flipped_alignprop_loss_fails_naming_method_and_metric(baselines, monkeypatch, capsys):
    directory, plots = baselines
    loss = alignprop.Method.loss
    monkeypatch.setattr(alignprop.Method, "loss", lambda self, rewards: -loss(self, rewards))
    code, out = run_cli(["regress", "--methods", "alignprop", "--baselines", directory, "--out", plots])
    assert code == 1
    line = [x for x in out.splitlines() if x.startswith("alignprop: eval_reward_mean")]
    assert len(line) == 1 and re.match(r"alignprop: eval_reward_mean at step \d = [-\d.]+ below band \[", line[0]), out
    value, lo = map(float, re.findall(r"= ([-\d.e]+) below band \[([-\d.e]+),", line[0])[0])
    assert value < lo
    assert "curve(s) left their band" in capsys.readouterr().err


@pytest.mark.slow
def test_a_metric_that_becomes_nan_fails(baselines, monkeypatch):
    directory, plots = baselines
    step = alignprop.Method.step

    def nan_step(self):
        out = step(self)
        return {**out, "reward_mean": math.nan} if self.ctx.costs.images > 4 else out

    monkeypatch.setattr(alignprop.Method, "step", nan_step)
    code, out = run_cli(["regress", "--methods", "alignprop", "--baselines", directory, "--out", plots])
    assert code == 1 and "alignprop: reward_mean became NaN (or went missing) at step 3" in out, out


@pytest.mark.slow
def test_regress_bad_input(baselines, capsys, tmp_path):
    directory, _ = baselines
    assert cli.main(["regress", "--methods", "ddpo", "--baselines", directory]) == 2
    assert "no baseline for ddpo" in capsys.readouterr().err
    assert cli.main(["regress", "--set", "steps=2", "--baselines", directory]) == 2
    assert "--set only applies with --update" in capsys.readouterr().err
    code, out = run_cli(["regress", "--baselines", str(tmp_path / "none")])
    assert code == 0 and "no baselines under" in out


def test_kl_band_is_taken_on_logs_and_sees_a_method_that_stopped_moving():
    # three seeds' KL to the base model at steps 0, 2, 4 (the DDPO baseline's shape: factors apart)
    per_seed = np.array([[0.0, 483.0, 1221.0], [0.0, 1923.0, 4601.0], [0.0, 1021.0, 2115.0]])
    mean, std, lo, hi = regress.band(per_seed, regress.ABS_FLOOR)
    assert lo[2] < 0  # the linear band: zero KL (nothing learnt) would pass
    mean, std, lo, hi = regress.band(per_seed, regress.ABS_FLOOR, log=True)
    logs = np.log(per_seed[:, 1:])
    half = np.maximum(3 * logs.std(0, ddof=1), math.log(1.5))
    assert np.allclose(lo[1:], np.exp(logs.mean(0) - half)) and np.allclose(hi[1:], np.exp(logs.mean(0) + half))
    assert lo[0] == -regress.ABS_FLOOR and hi[0] == regress.ABS_FLOOR  # step 0: every seed 0, the floor
    assert 0 < lo[1] < per_seed[:, 1].min() and hi[2] > per_seed[:, 2].max()
    baseline = {"method": "ddpo", "finite": {}, "curves": {"kl_to_base": {
        "step": [0, 2, 4], "lower": lo.tolist(), "upper": hi.tolist()}}}
    stopped = pd.DataFrame({"step": [0, 2, 4], "kl_to_base": [0.0, 0.0, 0.0]})
    assert regress.check(baseline, [stopped]) == [
        f"ddpo: kl_to_base at step 2 = 0 below band [{lo[1]:.4g}, {hi[1]:.4g}] (and 1 more steps)"]
    healthy = pd.DataFrame({"step": [0, 2, 4], "kl_to_base": per_seed[0]})
    assert regress.check(baseline, [healthy]) == []


def test_a_baseline_name_can_name_another_embedded_world(tmp_path):
    from bench.drivers.regress import parse_name

    assert parse_name("ddpo") == ("ddpo", [])
    assert parse_name("ddpo-sf@tiny-flow") == ("ddpo-sf", ["model=models/tiny-flow"])
    for bad, says in (("nope@tiny-flow", "unknown method 'nope'"), ("ddpo@no-such-world", "no embedded model")):
        with pytest.raises(BenchError, match=says):
            parse_name(bad)
