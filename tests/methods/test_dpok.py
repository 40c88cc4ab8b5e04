"""DPOK (methods/dpok.py): the KL penalty to the base model, the step skip, and a run killed and resumed."""
import math

import pytest
import torch
from conftest import assert_resumes_to_the_same_run, method_context, small_run_args

from bench.core.config import resolve
from diffalign.errors import BenchError
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from diffalign.sampling import initial_noise, kl_to_base
from methods import dpok
from rewards import get_reward


def _context(pipe_dir, overrides):
    """A Context on the small pipeline: 3 sampler steps, every one trained (the preset skips 2 of 10)."""
    cfg = resolve("dpok", ["model=x", "sampler.num_steps=3", "dpok.skip_first_steps=0", "dpok.skip_last_steps=0"]
                  + overrides)
    pipe = load_pipeline(pipe_dir)
    return method_context(cfg, pipe, add_lora(pipe.unet, 4, 4.0, seed=0), get_reward("jpeg-incompressibility"))


def test_dpok_kl_penalty_is_zero_at_the_base_model_and_grows(small_pixel_pipeline_dir):
    ctx = _context(small_pixel_pipeline_dir, ["dpok.g_batch=2", "dpok.p_step=1", "dpok.p_batch=2", "dpok.grad_accum=1",
                                              "dpok.lr=0.05", "dpok.baseline=value"])
    x_T = initial_noise(ctx.pipe, 2, torch.Generator().manual_seed(0))

    def kl_now():
        return kl_to_base(ctx.pipe, ["a red circle"] * 2, x_T, 3, 3.0, 1.0, torch.Generator().manual_seed(1))

    assert torch.equal(kl_now(), torch.zeros(2, dtype=torch.float64))  # LoRA starts at B = 0: the base model
    m = dpok.Method(ctx)
    first = m.step()
    assert first["kl_penalty"] == 0.0 and first["ratio_mean"] == 1.0
    second = m.step()
    assert second["kl_penalty"] > 0 and math.isfinite(second["value_loss"])
    assert (kl_now() > 0).all()


def test_skipped_steps_stay_out_of_the_buffer(small_pixel_pipeline_dir):
    ctx = _context(small_pixel_pipeline_dir, ["dpok.g_batch=2", "dpok.p_step=1", "dpok.p_batch=2", "dpok.grad_accum=1",
                                              "dpok.skip_last_steps=2"])
    m = dpok.Method(ctx)
    m.step()
    assert m.buffer["t_index"].tolist() == [0, 0] and len(m.buffer["x_t"]) == 2
    with pytest.raises(BenchError, match="leave at least one"):
        resolve("dpok", ["dpok.skip_first_steps=1", "dpok.skip_last_steps=9"])


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "dpok.g_batch=2", "dpok.p_step=2", "dpok.p_batch=2", "dpok.grad_accum=1", "dpok.baseline=value",
        "sampler.eta=1.0", "dpok.lr=0.01", "reward=jpeg-compressibility", "dpok.skip_first_steps=0",
        "dpok.skip_last_steps=0"]
    assert_resumes_to_the_same_run("dpok", args, tmp_path)
