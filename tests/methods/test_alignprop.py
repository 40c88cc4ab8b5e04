"""AlignProp: the reward gradient through the chain against finite differences, truncation variants,
checkpointing, and the method's update direction."""

import pytest
import torch
from conftest import assert_resumes_to_the_same_run, method_context, small_run_args
from diffusers import DDIMScheduler

from bench.core.config import resolve
from diffalign import ddim, sampling
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from methods import alignprop
from rewards import get_reward

PROMPTS = ["a red circle", "two blue squares"]
STEPS = 4


@pytest.fixture()
def pipe64(small_pixel_pipeline_dir):
    """float64 pipeline with a LoRA whose B matrices are non-zero (so every LoRA weight matters).

    It samples with leading spacing: with trailing spacing the first step is t = 999, where x0 = (x - ...) /
    sqrt(abar) amplifies by ~600 and x0 clipping puts kinks within any finite-difference step."""
    pipe = load_pipeline(small_pixel_pipeline_dir, dtype=torch.float64)
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "timestep_spacing": "leading",
                                                "steps_offset": 1})
    params = add_lora(pipe.unet, rank=2, alpha=2.0, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return pipe, params


def _reward_weights(pipe):
    return torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _objective(pipe, mask=None, checkpointing=True, eta=0.0, detach_reference=False):
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    gen = torch.Generator().manual_seed(13)
    if detach_reference:
        images = _reference_detach_sampler(pipe, x_T, mask)
    else:
        images = sampling.sample_with_grad(pipe, PROMPTS, x_T, STEPS, 2.0, eta, grad_mask=mask,
                                           checkpointing=checkpointing, generator=gen)
    w = _reward_weights(pipe)
    return (images * w).sum(dim=(1, 2, 3)).mean()


def _reference_detach_sampler(pipe, x_T, mask):
    """The original code's rule, written plainly: run every UNet with grad, detach masked outputs."""
    cond, uncond = sampling.embed(pipe, PROMPTS, 2.0)
    timesteps = ddim.set_timesteps(pipe.scheduler, STEPS)
    x = x_T
    for i, t in enumerate(timesteps):
        eps = sampling.guided_eps(pipe.unet, x, t, cond, uncond, 2.0)
        if not mask[i]:
            eps = eps.detach()
        x = ddim.ddim_step(pipe.scheduler, eps, int(t), x, STEPS, 0.0).prev
    return pipe.decode(x)


def _grad(pipe, params, **kw):
    for p in params:
        p.grad = None
    _objective(pipe, **kw).backward()
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_full_backprop_gradient_matches_finite_differences(pipe64, eta):
    pipe, params = pipe64
    grad = _grad(pipe, params, eta=eta)
    assert grad.abs().max() > 0
    v = torch.randn(grad.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = 1e-5

    def f_at(scale):
        with torch.no_grad():
            off = 0
            for p in params:
                n = p.numel()
                p.add_(scale * v[off:off + n].view_as(p))
                off += n
            val = float(_objective(pipe, eta=eta))
            off = 0
            for p in params:
                n = p.numel()
                p.sub_(scale * v[off:off + n].view_as(p))
                off += n
        return val

    fd = (f_at(h) - f_at(-h)) / (2 * h)
    assert float(grad @ v) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_checkpointing_on_and_off_give_the_same_gradient(pipe64):
    pipe, params = pipe64
    mask = [False, True, False, True]
    for m in (None, mask):
        g_on = _grad(pipe, params, mask=m, checkpointing=True)
        g_off = _grad(pipe, params, mask=m, checkpointing=False)
        assert torch.allclose(g_on, g_off, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("mask", [[False, False, True, True], [True, False, True, False], [False, False, False, True]])
def test_masked_steps_equal_detaching_the_unet_output(pipe64, mask):
    pipe, params = pipe64
    ours = _grad(pipe, params, mask=mask)
    ref = _grad(pipe, params, mask=mask, detach_reference=True)
    assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-13)
    full = _grad(pipe, params)
    assert not torch.allclose(ours, full, rtol=1e-3)  # truncation really changes the gradient


def test_last_k_with_k_equal_to_all_steps_is_full_backprop(pipe64):
    pipe, params = pipe64
    mask = alignprop.truncation_mask("last_k", STEPS, torch.Generator(), k=STEPS)
    assert torch.allclose(_grad(pipe, params, mask=mask), _grad(pipe, params), rtol=1e-12)


def test_no_kept_step_means_no_parameter_gradient(pipe64):
    pipe, params = pipe64
    assert not _objective(pipe, mask=[False] * STEPS).requires_grad


def test_per_step_keep_probability_rises_along_the_chain():
    T, n = 10, 4000
    g = torch.Generator().manual_seed(0)
    masks = torch.tensor([alignprop.truncation_mask("per_step", T, g) for _ in range(n)], dtype=torch.float64)
    p = torch.arange(1, T + 1, dtype=torch.float64) / (T + 1)
    se = (p * (1 - p) / n).sqrt()
    assert ((masks.mean(0) - p).abs() < 4 * se).all()
    assert not all(bool(m.all()) for m in masks[:50])  # not contiguous-all


def test_last_k_rules():
    g = torch.Generator().manual_seed(0)
    assert alignprop.truncation_mask("last_k", 10, g, k=3) == [False] * 7 + [True] * 3
    assert alignprop.truncation_mask("full", 5, g) == [True] * 5
    ks = [sum(alignprop.truncation_mask("last_k", 10, g, k_dist="uniform")) for _ in range(3000)]
    counts = torch.bincount(torch.tensor(ks), minlength=11)[1:].double()
    assert counts.min() > 0 and ((counts / 3000 - 0.1).abs() < 4 * (0.09 / 3000) ** 0.5).all()
    masks = [alignprop.truncation_mask("last_k", 50, g, k_dist="gaussian") for _ in range(2000)]
    for m in masks[:100]:  # contiguous suffix
        k = sum(m)
        assert m == [False] * (50 - k) + [True] * k
    mean_k = sum(sum(m) for m in masks) / len(masks)
    assert 7.7 < mean_k < 8.9  # K ~ N(8, 5) clipped to [1, 50] (mean about 8.3)
    with pytest.raises(ValueError):
        alignprop.truncation_mask("last-k", 10, g)


def test_alignprop_step_raises_the_reward_of_its_batch(small_pixel_pipeline_dir):
    """One AdamW step along the method's gradient must raise the reward on the same noise and prompts."""
    cfg = resolve("alignprop", ["model=x", "sampler.num_steps=3", "alignprop.batch_size=2",
                                "alignprop.truncation=full", "alignprop.lr=1e-3"])
    pipe = load_pipeline(small_pixel_pipeline_dir)
    params = add_lora(pipe.unet, 4, 4.0, seed=0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    ctx = method_context(cfg, pipe, params, get_reward("saturation"), PROMPTS)
    method = alignprop.Method(ctx)

    def batch_reward():
        g = ctx.generator.get_state()
        prompts, x_T = ctx.draw_prompts(2), ctx.noise(2)
        ctx.generator.set_state(g)
        with torch.no_grad():
            img = sampling.sample_with_grad(pipe, prompts, x_T, 3, cfg.sampler.guidance, 0.0)
        return float(ctx.reward(img, prompts).mean())

    before = batch_reward()
    metrics = method.step()
    assert metrics["reward_mean"] == pytest.approx(before, rel=1e-5)
    ctx.generator.set_state(torch.Generator().manual_seed(0).get_state())
    assert batch_reward() > before
    assert ctx.costs.images == 2 and ctx.costs.reward_queries == 2 and ctx.costs.unet_bwd == 3 * 4


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "alignprop.batch_size=2", "alignprop.truncation=per_step", "alignprop.lr=0.01"]
    assert_resumes_to_the_same_run("alignprop", args, tmp_path)
