"""Reward specs: weighted sums (each term logged), a user's own reward class as module:Class, held-out metrics,
and the refusal of a non-differentiable reward by a method that backpropagates it."""
import os
import subprocess
import sys
import textwrap

import pandas as pd
import pytest
import torch

from bench import harness
from bench.config import resolve
from bench.errors import BenchError
from rewards import WeightedSum, get_reward

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PLUGIN = textwrap.dedent('''
    import torch

    class Redness:
        """Mean red channel: a differentiable reward written outside the project."""
        differentiable = True

        def __call__(self, images, prompts):
            return images[:, 0].flatten(1).mean(1)

    class RedCount:
        differentiable = False

        def __call__(self, images, prompts):
            return (images[:, 0] > 0.5).flatten(1).float().sum(1)
''')


@pytest.fixture()
def plugin_dir(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_weighted_sum_is_the_sum_and_keeps_each_term():
    images = torch.rand(3, 3, 8, 8, requires_grad=True)
    r = get_reward("saturation:2.0, jpeg-compressibility:0.5")
    assert isinstance(r, WeightedSum) and not r.differentiable
    sat, jpeg = get_reward("saturation")(images, [""] * 3), get_reward("jpeg-compressibility")(images, [""] * 3)
    torch.testing.assert_close(r(images, [""] * 3), 2.0 * sat + 0.5 * jpeg)
    torch.testing.assert_close(r.last_terms["saturation"], sat.detach())
    torch.testing.assert_close(r.last_terms["jpeg-compressibility"], jpeg)
    assert get_reward("saturation:-1,jpeg-incompressibility:1e-2").name == "saturation:-1,jpeg-incompressibility:0.01"


def test_user_reward_class_by_module_and_name(plugin_dir):
    r = get_reward("my_rewards:Redness")
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    s = r(images, ["a", "b"])
    torch.testing.assert_close(s, images[:, 0].flatten(1).mean(1))
    s.sum().backward()
    assert images.grad is not None and torch.all(images.grad[:, 0] > 0)
    assert r.name == "my_rewards:Redness" and r.differentiable
    for spec, msg in [("my_rewards:Nope", "has no attribute 'Nope'"), ("no_such_mod:Cls", "cannot import module"),
                      ("my_rewards:Redness,saturation:1", "bad reward term")]:
        with pytest.raises(BenchError, match=msg):
            get_reward(spec)


def _small(small_pixel_pipeline_dir, tmp_path, *extra):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    return [f"model={small_pixel_pipeline_dir}", f"eval_prompts={prompts}", "steps=2", "checkpoint_every=2",
            "eval.every=1", "eval.grid_every=2", "eval.num_seeds=2", "eval.num_steps=2", "sampler.num_steps=2",
            "eval.kl_seeds=0", "threads=2", *extra]


def test_plugin_reward_trains_with_alignprop_and_heldout_metrics_are_logged(plugin_dir, small_pixel_pipeline_dir,
                                                                              tmp_path):
    args = _small(small_pixel_pipeline_dir, tmp_path, "reward=my_rewards:Redness", "alignprop.batch_size=2",
                  "alignprop.truncation=per_step", "eval.metrics=[saturation, jpeg-compressibility]")
    run_dir = str(tmp_path / "run")
    harness.start(resolve("alignprop", args), run_dir)
    df = pd.read_parquet(os.path.join(run_dir, "metrics.parquet"))
    for col in ("eval_saturation_mean", "eval_saturation_sem", "eval_jpeg-compressibility_mean"):
        assert df[col].notna().all(), col
    assert (df["eval_jpeg-compressibility_mean"] < 0).all()  # -kB
    # a policy-gradient method takes a non-differentiable weighted sum, each term logged on its own
    args = _small(small_pixel_pipeline_dir, tmp_path, "reward=saturation:1.0,jpeg-compressibility:0.1", "ddpo.samples_per_step=2",
                  "ddpo.sample_batch_size=2", "ddpo.train_batch_size=2", "ddpo.grad_accum=1", "ddpo.stat_min_count=2",
                  "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0")
    run_dir = str(tmp_path / "run2")
    harness.start(resolve("ddpo", args), run_dir)
    df = pd.read_parquet(os.path.join(run_dir, "metrics.parquet"))
    row = df.iloc[1]
    assert row["reward_mean"] == pytest.approx(row["reward/saturation"] + 0.1 * row["reward/jpeg-compressibility"],
                                               rel=1e-5)
    assert df["eval_reward/saturation"].notna().all()


def test_methods_that_backpropagate_refuse_a_non_differentiable_plugin(plugin_dir, small_pixel_pipeline_dir,
                                                                         tmp_path):
    args = _small(small_pixel_pipeline_dir, tmp_path, "reward=my_rewards:RedCount")
    with pytest.raises(BenchError, match="backpropagates the reward.*not differentiable"):
        harness.start(resolve("alignprop", args), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


def test_plugin_through_the_cli_from_the_current_directory(plugin_dir, small_pixel_pipeline_dir, tmp_path):
    args = _small(small_pixel_pipeline_dir, tmp_path, "alignprop.batch_size=2", "alignprop.truncation=per_step",
                  "steps=1")
    cmd = [sys.executable, "-m", "bench", "run", "--method", "alignprop", "--reward", "my_rewards:Redness",
           "--out", str(tmp_path / "cli")] + [a for s in args for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=plugin_dir, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(tmp_path / "cli" / "summary.json")
