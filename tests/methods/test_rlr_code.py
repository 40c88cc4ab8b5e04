"""RLR as the released code does it (methods/rlr_code.py): AlignProp K = 1 when chain_len = 0, one plus chain_len
updates per batch, a run that repeats and resumes, bad input."""
import math
import os

import pytest
import torch
from conftest import assert_resumes_to_the_same_run, error_line, leading_lora_context, small_run_args

from bench.core.config import resolve
from methods import alignprop, rlr_code

PROMPTS = ["a red circle", "two blue squares"]


def test_rlr_code_with_chain_len_zero_is_alignprop_k1(small_pixel_pipeline_dir):
    common = ["sampler.num_steps=3", "sampler.eta=0.0"]
    a = leading_lora_context(small_pixel_pipeline_dir, "rlr-code", common + [
        "rlr_code.chain_len=0", "rlr_code.batch_size=2", "rlr_code.loss_coeff=0.01", "rlr_code.grad_clip=5.0"])
    b = leading_lora_context(small_pixel_pipeline_dir, "alignprop", common + [
        "alignprop.truncation=last_k", "alignprop.k=1", "alignprop.k_dist=fixed", "alignprop.batch_size=2",
        "alignprop.weight_decay=1e-4"])
    rlr_code.Method(a).step()
    alignprop.Method(b).step()
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(a.trainable, b.trainable))
    assert a.costs.images == b.costs.images == 2


def test_rlr_code_step_makes_one_plus_chain_len_updates(small_pixel_pipeline_dir):
    ctx = leading_lora_context(small_pixel_pipeline_dir, "rlr-code", ["sampler.num_steps=3", "rlr_code.chain_len=3",
                                                          "rlr_code.batch_size=2"])
    m = rlr_code.Method(ctx)
    out = m.step()
    assert out["updates"] == 4 and m.opt.state_dict()["state"][0]["step"] == 4
    assert math.isfinite(out["reward_mean"]) and 0 <= out["ho_zeroed"] <= 3


def test_variant_name():
    assert rlr_code.variant(resolve("rlr-code")) == "rlr-code/chain_len=2/ho_coeff=0.001/clip=0.0001/logprob-mean"


@pytest.mark.slow
def test_runs_repeat_and_resume_after_a_kill(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "eval.kl_seeds=0", "rlr_code.batch_size=2", "rlr_code.chain_len=2", "rlr_code.lr=0.01", "sampler.num_steps=3",
        "sampler.eta=1.0"]
    a, manifest = assert_resumes_to_the_same_run("rlr-code", args, tmp_path)
    assert manifest["variant"] == rlr_code.variant(resolve("rlr-code", args))
    assert a["reward_mean"].iloc[1:].nunique() == 4 and (a["grad_norm"].iloc[1:] > 0).all()  # it really trains


def test_bad_input_gives_one_clear_line(capsys, tmp_path, small_pixel_pipeline_dir):
    out = str(tmp_path / "run")
    base = ["run", "--out", out, "--set", f"model={small_pixel_pipeline_dir}"]
    cases = [
        (["--method", "rlr-code", "rlr_code.h=3"], "unknown config key 'rlr_code.h'; accepted: rlr_code.adam_betas"),
        (["--method", "rlr-code", "rlr_code.logprob_reduction=max"], "accepted: mean, sum"),
        (["--method", "rlr-code", "rlr_code.chain_len=-1"], "'rlr_code.chain_len' = -1; accepted: an integer in 0.."),
        (["--method", "rlr-code", "--reward", "jpeg-compressibility"], "is not differentiable"),
    ]
    for argv, expected in cases:
        assert expected in error_line(capsys, base + argv), argv
        assert not os.path.exists(out), argv
