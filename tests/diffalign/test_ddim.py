"""One DDIM step (diffalign/ddim.py) against diffusers' DDIMScheduler.step and against closed-form Gaussians."""
import pytest
import torch
from diffusers import DDIMScheduler

from bench.tinyworld import models as tiny_models
from diffalign import ddim


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers_scheduler_step(eta, spacing):
    sched = DDIMScheduler.from_config({**tiny_models.SCHEDULER_CONFIG, "timestep_spacing": spacing, "steps_offset": 1})
    g = torch.Generator().manual_seed(0)
    timesteps = ddim.set_timesteps(sched, 4)
    for t in timesteps:
        # float64 latents, so both sides compute from the same float32 alphas without float32 rounding
        x, eps, z = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        ref = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        ours = ddim.ddim_step(sched, eps, int(t), x, 4, eta, noise=z).prev
        if torch.isnan(ref).any():
            # diffusers: sqrt(1 - a_prev - sigma^2) of a float32 rounding below 0 at t = 999, eta = 1
            assert t == 999 and eta == 1.0 and torch.isfinite(ours).all()
            continue
        # where 1 - a_prev - sigma^2 nearly cancels (t = 999, eta near 1), diffusers' float32 variance is
        # only good to ~1e-4 after the square root
        a_t, a_prev = ddim.alphas(sched, int(t), 4)
        direction = float((1 - a_prev - ddim.step_std(sched, int(t), 4, eta) ** 2).clamp(min=0).sqrt())
        tol = 1e-6 if direction > 0.05 else 1e-3
        assert torch.allclose(ours, ref, rtol=tol, atol=tol), (t, (ours - ref).abs().max())


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_log_prob_is_the_closed_form_gaussian(small_pixel_pipeline, eta, reduction):
    sched = small_pixel_pipeline.scheduler
    g = torch.Generator().manual_seed(3)
    timesteps = ddim.set_timesteps(sched, 5)
    for t in timesteps:
        t = int(t)
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        prev = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        out = ddim.ddim_step(sched, eps, t, x, 5, eta, prev=prev, reduction=reduction)
        # reference: the DDIM paper's mean and sigma, written out in float64
        prev_t = t - sched.config.num_train_timesteps // 5
        a_t = sched.alphas_cumprod[t].double()
        a_prev = sched.alphas_cumprod[prev_t].double() if prev_t >= 0 else sched.final_alpha_cumprod.double()
        std = float(eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
        if std == 0:  # the last step with set_alpha_to_one: deterministic, no density
            assert out.log_prob is None and float(out.std) == 0
            continue
        dens = torch.distributions.Normal(mean, std).log_prob(prev).flatten(1)
        want = dens.mean(1) if reduction == "mean" else dens.sum(1)
        assert float(out.std) == pytest.approx(std, rel=1e-9)
        assert torch.allclose(out.log_prob, want, rtol=1e-6, atol=1e-6)


def test_per_sample_timesteps_equal_one_step_per_sample(small_pixel_pipeline):
    """DDPO trains on a different timestep per sample: the batched step must equal per-sample steps."""
    sched = small_pixel_pipeline.scheduler
    timesteps = ddim.set_timesteps(sched, 5)
    g = torch.Generator().manual_seed(4)
    t = timesteps[torch.tensor([0, 3, 4, 1])]
    x, eps, prev = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    batched = ddim.ddim_step(sched, eps, t, x, 5, 1.0, prev=prev)
    for i in range(4):
        one = ddim.ddim_step(sched, eps[i:i + 1], int(t[i]), x[i:i + 1], 5, 1.0, prev=prev[i:i + 1])
        assert torch.allclose(batched.mean[i], one.mean[0], atol=1e-6)
        assert torch.allclose(batched.log_prob[i], one.log_prob[0], atol=1e-5)


def test_gaussian_kl_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mp, mq = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, std.view(3, 1, 1).expand_as(mp)),
        torch.distributions.Normal(mq, std.view(3, 1, 1).expand_as(mq))).flatten(1)
    assert torch.allclose(ddim.gaussian_kl(mp, mq, std, "sum"), ref.sum(1), atol=1e-6)
    assert torch.allclose(ddim.gaussian_kl(mp, mq, std, "mean"), ref.mean(1), atol=1e-6)


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_half_precision_step_gives_its_log_prob_to_float32_accuracy(half):
    """Issue 26's second defect: the step's log-prob was computed in the latents' dtype.  With half-precision latents
    and model output, the log-prob of the sample actually taken (a half-precision tensor) must equal the float32
    computation from the same half-precision values to float32 accuracy (1e-5), not to one half-precision ulp (bf16:
    4.5e-3 at -0.58, 45x DDPO's clip range), and the sample comes back in the latents' dtype."""
    sched = DDIMScheduler.from_config(tiny_models.SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(0)
    t = int(ddim.set_timesteps(sched, 10)[5])
    x, eps, z = (torch.randn(4, 3, 8, 8, generator=g).to(half) for _ in range(3))
    out = ddim.ddim_step(sched, eps, t, x, 10, 1.0, noise=z)
    assert out.prev.dtype == half and out.log_prob.dtype == torch.float32
    ref = ddim.ddim_step(sched, eps.float(), t, x.float(), 10, 1.0, prev=out.prev.float())
    assert torch.allclose(out.log_prob, ref.log_prob, rtol=0, atol=1e-5), (out.log_prob - ref.log_prob).abs().max()
    # recomputing it later from the stored sample (what DDPO's and DPOK's ratios do) gives the same number
    again = ddim.ddim_step(sched, eps, t, x, 10, 1.0, prev=out.prev)
    assert torch.equal(again.log_prob, out.log_prob)
    kl = ddim.gaussian_kl(out.mean.to(half), ref.mean.to(half), out.std)
    assert kl.dtype == torch.float32
