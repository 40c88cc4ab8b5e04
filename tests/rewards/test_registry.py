"""The reward registry (rewards/__init__.py) and the small rewards: DDPO's JPEG definition, saturation, names
and what is accepted, weighted sums (each term logged), a user's own reward class as module:Class, held-out
metrics, and the refusal of a non-differentiable reward by a method that backpropagates it."""
import io
import os
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import ROOT
from PIL import Image

from bench.core import run
from bench.core.config import resolve
from diffalign.errors import BenchError
from rewards import WeightedSum, get_reward


def _ddpo_jpeg_kb(images):
    """DDPO's definition written independently: uint8, PIL JPEG quality 95, bytes / 1000."""
    out = []
    for im in images:
        arr = (im.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        out.append(len(buf.getvalue()) / 1000)
    return torch.tensor(out)


def test_jpeg_rewards_follow_ddpo_definition():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand((1, 3, 64, 64), generator=g)
    images = torch.cat([flat, noise])
    comp = get_reward("jpeg-compressibility")
    incomp = get_reward("jpeg-incompressibility")
    sizes = _ddpo_jpeg_kb(images)
    assert torch.allclose(comp(images, ["", ""]), -sizes)
    assert torch.allclose(incomp(images, ["", ""]), sizes)
    assert sizes[1] > 5 * sizes[0]  # noise is much larger than a flat image
    # kB are bytes / 1000, not / 1024
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="JPEG", quality=95)
    assert float(incomp(flat, [""])) == pytest.approx(buf.tell() / 1000)
    assert not comp.differentiable and not incomp.differentiable


def test_saturation_values_and_gradient():
    r = get_reward("saturation")
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    grey = torch.full((1, 3, 8, 8), 0.4)
    assert float(r(red, [""])) == pytest.approx(1.0)
    assert float(r(grey, [""])) == pytest.approx(0.0)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    r(x, ["", ""]).sum().backward()
    assert r.differentiable and x.grad.abs().sum() > 0


def test_unknown_reward_names_what_is_accepted():
    accepted = "accepted: aesthetic, .*jpeg-compressibility.*package.module:Class"
    with pytest.raises(BenchError, match=f"unknown reward 'aesthetics'.*{accepted}"):
        get_reward("aesthetics")


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


@pytest.mark.slow
def test_plugin_reward_trains_with_alignprop_and_heldout_metrics_are_logged(plugin_dir, small_pixel_pipeline_dir,
                                                                              tmp_path):
    args = _small(small_pixel_pipeline_dir, tmp_path, "reward=my_rewards:Redness", "alignprop.batch_size=2",
                  "alignprop.truncation=per_step", "eval.metrics=[saturation, jpeg-compressibility]")
    run_dir = str(tmp_path / "run")
    run.start(resolve("alignprop", args), run_dir)
    df = pd.read_parquet(os.path.join(run_dir, "metrics.parquet"))
    for col in ("eval_saturation_mean", "eval_saturation_sem", "eval_jpeg-compressibility_mean"):
        assert df[col].notna().all(), col
    assert (df["eval_jpeg-compressibility_mean"] < 0).all()  # -kB
    # a policy-gradient method takes a non-differentiable weighted sum, each term logged on its own
    args = _small(small_pixel_pipeline_dir, tmp_path, "reward=saturation:1.0,jpeg-compressibility:0.1",
                  "ddpo.samples_per_step=2", "ddpo.sample_batch_size=2", "ddpo.train_batch_size=2", "ddpo.grad_accum=1",
                  "ddpo.stat_min_count=2", "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0")
    run_dir = str(tmp_path / "run2")
    run.start(resolve("ddpo", args), run_dir)
    df = pd.read_parquet(os.path.join(run_dir, "metrics.parquet"))
    row = df.iloc[1]
    assert row["reward_mean"] == pytest.approx(row["reward/saturation"] + 0.1 * row["reward/jpeg-compressibility"],
                                               rel=1e-5)
    assert df["eval_reward/saturation"].notna().all()


def test_methods_that_backpropagate_refuse_a_non_differentiable_plugin(plugin_dir, small_pixel_pipeline_dir,
                                                                         tmp_path):
    args = _small(small_pixel_pipeline_dir, tmp_path, "reward=my_rewards:RedCount")
    with pytest.raises(BenchError, match="backpropagates the reward.*not differentiable"):
        run.start(resolve("alignprop", args), str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_plugin_through_the_cli_from_the_current_directory(plugin_dir, small_pixel_pipeline_dir, tmp_path):
    args = _small(small_pixel_pipeline_dir, tmp_path, "alignprop.batch_size=2", "alignprop.truncation=per_step",
                  "steps=1")
    cmd = [sys.executable, "-m", "bench", "run", "--method", "alignprop", "--reward", "my_rewards:Redness",
           "--out", str(tmp_path / "cli")] + [a for s in args for a in ("--set", s)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    r = subprocess.run(cmd, cwd=plugin_dir, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(tmp_path / "cli" / "summary.json")
