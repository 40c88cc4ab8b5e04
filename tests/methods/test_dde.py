"""DDE, our reconstruction (methods/dde.py): the credit curves (DDE's peaks strictly inside the trajectory on the
tiny world's and Stable Diffusion's schedules), uniform credit equal to Diffusion-DPO exactly, importance-sampled
timesteps, variant names, a run killed and resumed, bad input."""
import os

import pandas as pd
import pytest
import torch
from conftest import ROOT, assert_resumes_to_the_same_run, error_line, method_context, small_run_args
from diffusers import DDIMScheduler

from bench.core.config import resolve
from bench.tinyworld.models import SCHEDULER_CONFIG
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from diffalign.preference import Pairs, load_pairs, save_pairs
from methods import dde, diffusion_dpo
from rewards import get_reward

TINY = DDIMScheduler(**SCHEDULER_CONFIG)
SD = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                   set_alpha_to_one=False, steps_offset=1)


def _section(**kw):
    return {**dde.DEFAULTS, **kw}


@pytest.mark.parametrize("scheduler", [TINY, SD], ids=["tiny-cosine", "sd-scaled-linear"])
def test_dde_credit_peaks_strictly_inside_and_the_components_are_their_closed_forms(scheduler):
    T = len(scheduler.alphas_cumprod)
    w = dde.credit_weights(scheduler, _section())
    assert w.shape == (T,) and float(w.mean()) == pytest.approx(1.0) and (w >= 0).all()
    peak = int(w.argmax())
    assert 0 < peak < T - 1 and peak == round(0.5 * (T - 1))  # our reconstruction puts the peak at the split
    assert float(w[0]) < 0.5 * float(w[peak]) and float(w[-1]) < 0.5 * float(w[peak])
    assert int(dde.credit_weights(scheduler, _section(split=0.3)).argmax()) == round(0.3 * (T - 1))
    a = scheduler.alphas_cumprod.double()
    snr = a / (1 - a)
    parts = dde.component_weights(scheduler, 0.5, "posterior")
    for t in (1, 100, 500, 900):  # lambda = half the log-SNR drop; mu = 1 / (2 s_t^2 SNR) with the posterior s_t^2
        assert float(parts["stepwise"][t]) == pytest.approx(0.5 * float(torch.log(snr[t - 1] / snr[t])), rel=1e-9)
        s2 = 0.25 / (1 + 0.25 * snr[t])
        assert float(parts["single-shot"][t]) == pytest.approx(float(1 / (2 * s2 * snr[t])), rel=1e-9)
    assert torch.equal(dde.credit_weights(scheduler, _section(weighting="uniform")), torch.ones(T, dtype=torch.float64))
    # the components alone put their credit at the ends of the trajectory
    assert int(dde.credit_weights(scheduler, _section(weighting="single-shot")).argmax()) == T - 1


def _pair_file(tmp_path) -> str:
    g = torch.Generator().manual_seed(0)
    pairs = Pairs(["a red circle", "two blue squares", "a green triangle"] * 2, torch.rand(6, 3, 8, 8, generator=g),
                  torch.rand(6, 3, 8, 8, generator=g), {})
    path = str(tmp_path / "pairs.parquet")
    save_pairs(pairs, path)
    return path


def _context(pipe_dir, method, overrides):
    cfg = resolve(method, ["model=x", "reward=tiny-rating"] + overrides)
    pipe = load_pipeline(pipe_dir)
    return method_context(cfg, pipe, add_lora(pipe.unet, 4, 4.0, seed=0), get_reward("tiny-rating"))


def test_uniform_credit_is_diffusion_dpo_exactly(small_pixel_pipeline_dir, tmp_path):
    path = _pair_file(tmp_path)
    common = ["batch_size=4", "lr=0.01", "beta=500.0", f"pairs={path}"]
    a = _context(small_pixel_pipeline_dir, "dde", [f"dde.{o}" for o in common] + ["dde.weighting=uniform"])
    b = _context(small_pixel_pipeline_dir, "diffusion-dpo", [f"diffusion_dpo.{o}" for o in common])
    ma, mb = dde.Method(a), diffusion_dpo.Method(b)
    first = []
    for _ in range(2):  # the same batch, t and noise each step: the same loss, then the same weights
        oa, ob = ma.step(), mb.step()
        assert oa["loss"] == ob["loss"] and oa["implicit_margin"] == ob["implicit_margin"]
        first.append(ob["loss"])
    assert all(torch.equal(p, q) for p, q in zip(a.trainable, b.trainable))
    assert a.costs.unet_fwd == b.costs.unet_fwd == 2 * (4 * 2 * 2)  # policy + reference, winner + loser
    assert a.costs.unet_bwd == 2 * 8 and a.costs.images == 0 and a.costs.reward_queries == 0  # offline pairs
    # DDE's own credit on the same batches, t and noise: log 2 at the reference, then another update
    m = dde.Method(_context(small_pixel_pipeline_dir, "dde", [f"dde.{o}" for o in common]))
    assert m.step()["loss"] == first[0] and m.step()["loss"] != first[1]


def test_importance_sampled_timesteps_follow_the_credit(small_pixel_pipeline_dir, tmp_path):
    ctx = _context(small_pixel_pipeline_dir, "dde", [f"dde.pairs={_pair_file(tmp_path)}", "dde.t_sampling=importance"])
    m = dde.Method(ctx)
    t, weight = m.draw_timesteps(20000)
    assert torch.equal(weight, torch.ones(20000))
    expected = float((m.weights.double() / m.weights.double().sum() * torch.arange(len(m.weights))).sum())
    assert float(t.float().mean()) == pytest.approx(expected, rel=0.02)
    t, weight = dde.Method(_context(small_pixel_pipeline_dir, "dde", [f"dde.pairs={_pair_file(tmp_path)}"])) \
        .draw_timesteps(5)
    assert torch.allclose(weight, dde.credit_weights(ctx.pipe.scheduler, ctx.cfg).float()[t])


def test_variant_names():
    assert dde.variant(resolve("dde")) == ("dde/reconstructed/weights-dde(split=0.5)/single-shot-var-posterior(std=0.5)"
                                           "/t-uniform/pairs-tiny-pairs")
    assert dde.variant(resolve("dde", ["dde.weighting=uniform", "dde.pairs=base"])) == \
        "dde/reconstructed/weights-uniform/pairs-base"
    assert dde.variant(resolve("dde", ["dde.weighting=stepwise", "dde.t_sampling=importance", "dde.label_noise=0.1"])) \
        == "dde/reconstructed/weights-stepwise/t-importance/pairs-tiny-pairs/label-noise-0.1"
    assert diffusion_dpo.variant(resolve("diffusion-dpo")) == "diffusion-dpo/pairs-tiny-pairs"


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        f"dde.pairs={_pair_file(tmp_path)}", "dde.batch_size=4", "dde.lr=0.01", "reward=tiny-rating",
        "eval.metrics=[tiny-clip]"]
    a, manifest = assert_resumes_to_the_same_run("dde", args, tmp_path)
    assert manifest["variant"].startswith("dde/reconstructed/weights-dde") and (a["grad_norm"].iloc[1:] > 0).all()
    assert a["win_rate"].iloc[0] == 0.5 and a["win_rate"].notna().sum() == 3


def test_bad_input_gives_one_clear_line(capsys, tmp_path, small_pixel_pipeline_dir):
    out = str(tmp_path / "run")
    base = ["run", "--out", out, "--set", f"model={small_pixel_pipeline_dir}"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a red circle", "image_0": "gone.png", "image_1": "gone.png", "winner": 0}\n')
    cases = [
        (["--method", "dde", "dde.weighting=late"],
         "'dde.weighting' = 'late'; accepted: dde, stepwise, single-shot, uniform"),
        (["--method", "dde", "dde.split=1.5"], "'dde.split' = 1.5; accepted: a finite number in (0, 1)"),
        (["--method", "dde", "dde.t_sampling=sorted"], "accepted: uniform, importance"),
        (["--method", "dde", "dde.label_noise=0.7"], "'dde.label_noise' = 0.7; accepted: a finite number in [0, 0.5)"),
        (["--method", "dde", f"dde.pairs={bad}"], "image file 'gone.png' does not exist"),
        (["--method", "diffusion-dpo", f"diffusion_dpo.pairs={tmp_path / 'none.parquet'}"], "does not exist; accepted"),
        (["--method", "diffusion-dpo", "diffusion_dpo.samples_per_prompt=1"],
         "'diffusion_dpo.samples_per_prompt' = 1; accepted: an integer in 2..1024"),
    ]
    for argv, expected in cases:
        assert expected in error_line(capsys, base + argv), argv
        assert not os.path.exists(out), argv


def test_committed_pair_set_is_labelled_by_the_hidden_rating():
    pairs = load_pairs(os.path.join(ROOT, "models", "tiny-pairs"))
    assert len(pairs) == pairs.meta["pairs"] and pairs.meta["labelled_by"] == "tiny-rating"
    rating = get_reward("tiny-rating")
    gap = rating(pairs.winners, pairs.prompts) - rating(pairs.losers, pairs.prompts)
    assert (gap > pairs.meta["tie"] - 1e-3).all(), float(gap.min())  # PNG rounding of 8-bit images aside
    assert isinstance(pd.read_parquet(os.path.join(ROOT, "models", "tiny-pairs", "pairs.parquet")), pd.DataFrame)
