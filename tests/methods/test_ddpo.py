"""DDPO (methods/ddpo.py): its estimators against the exact gradient of an analytic chain, ratios, the step skip,
and a run killed and resumed."""
import math

import pytest
import torch
from analytic_chain import LinearGaussianChain
from conftest import assert_resumes_to_the_same_run, method_context, small_run_args

from bench.core.config import resolve
from diffalign.ddim import gaussian_log_prob, set_timesteps
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from methods import ddpo
from rewards import get_reward


def test_chain_exact_gradient_is_the_gradient_of_the_closed_form():
    chain = LinearGaussianChain()
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64, requires_grad=True)
    chain.expected_reward(theta).backward()
    assert torch.allclose(theta.grad, chain.exact_gradient(theta.detach()), atol=1e-12)
    # and the closed form agrees with Monte Carlo
    xs = chain.sample(theta.detach(), 200_000, torch.Generator().manual_seed(0))
    r = chain.reward(xs[-1])
    assert abs(float(r.mean() - chain.expected_reward(theta.detach()))) < 4 * float(r.std()) / math.sqrt(len(r))


def _ddpo_estimate(chain, theta, n, generator, estimator):
    """One DDPO gradient estimate from n trajectories, through the method's own loss and the suite's
    log-prob (summed over elements = the true density), summed over steps."""
    th = theta.clone().requires_grad_(True)
    xs = chain.sample(theta, n, generator)
    adv = chain.reward(xs[-1])  # the raw reward: REINFORCE is unbiased without a baseline
    loss = 0.0
    for k in range(chain.T):
        lp = gaussian_log_prob(xs[k + 1], chain.mean(k, xs[k], th), chain.sigma[k], "sum")
        out = ddpo.policy_loss(lp, lp.detach(), adv, estimator, clip_range=1e-4)
        assert torch.equal(out.ratio, torch.ones_like(out.ratio))
        loss = loss + out.loss
    (grad,) = torch.autograd.grad(loss, th)
    return -grad  # the loss is the negative surrogate


def test_ddpo_sf_estimator_is_unbiased_on_the_analytic_chain():
    chain = LinearGaussianChain()
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    est = torch.stack([_ddpo_estimate(chain, theta, 2000, g, "sf") for _ in range(100)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(len(est))
    exact = chain.exact_gradient(theta)
    assert ((mean - exact).abs() < 3 * se).all(), (mean, exact, se)
    assert (se < 0.2 * exact.abs()).all()  # the test has the power to see a wrong gradient


def test_ddpo_is_gradient_equals_sf_at_the_first_update():
    chain = LinearGaussianChain()
    theta = torch.tensor([0.3, -0.2], dtype=torch.float64)
    sf = _ddpo_estimate(chain, theta, 500, torch.Generator().manual_seed(2), "sf")
    is_ = _ddpo_estimate(chain, theta, 500, torch.Generator().manual_seed(2), "is")
    assert torch.allclose(sf, is_, rtol=1e-12)


def _context(pipe_dir, method, overrides):
    """A Context on the small pipeline: 3 sampler steps, every one trained (the presets skip 2 of 10)."""
    cfg = resolve(method, ["model=x", "sampler.num_steps=3", "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0"]
                  + overrides)
    pipe = load_pipeline(pipe_dir)
    return method_context(cfg, pipe, add_lora(pipe.unet, 4, 4.0, seed=0), get_reward("jpeg-incompressibility"))


@pytest.mark.parametrize("method", ["ddpo", "ddpo-sf"])
def test_importance_ratio_is_exactly_one_before_the_first_update(small_pixel_pipeline_dir, monkeypatch, method):
    ctx = _context(small_pixel_pipeline_dir, method, ["ddpo.samples_per_step=4", "ddpo.sample_batch_size=2",
                                                       "ddpo.train_batch_size=2", "ddpo.grad_accum=2",
                                                       "ddpo.timestep_fraction=1.0"])
    m = ddpo.Method(ctx)
    seen = []
    real = ddpo.policy_loss

    def spy(lp, old, adv, est, clip):
        out = real(lp, old, adv, est, clip)
        seen.append(out.ratio.clone())
        return out

    monkeypatch.setattr(ddpo, "policy_loss", spy)
    metrics = m.step()  # a single optimizer update, after every stored step has been scored
    ratios = torch.cat(seen)
    assert len(ratios) == 4 * 3  # every stored (sample, step)
    assert torch.equal(ratios, torch.ones_like(ratios)), (ratios - 1).abs().max()
    assert metrics["clipfrac"] == 0 and metrics["updates"] == 1
    assert ctx.costs.images == 4 and ctx.costs.reward_queries == 4


def test_skipped_steps_are_left_out_of_training(small_pixel_pipeline_dir, monkeypatch):
    ctx = _context(small_pixel_pipeline_dir, "ddpo-sf", ["ddpo.samples_per_step=4", "ddpo.sample_batch_size=2",
                                                          "ddpo.train_batch_size=2", "ddpo.grad_accum=2",
                                                          "ddpo.skip_first_steps=1", "ddpo.skip_last_steps=1"])
    assert ddpo.variant(ctx.cfg).endswith("/steps-1:2-of-3")
    seen = []
    real = ddpo.process.step

    def spy(scheduler, eps, t, x_t, *args, **kw):
        if kw.get("prev") is not None:  # the training phase's recomputed step
            seen.append(t)
        return real(scheduler, eps, t, x_t, *args, **kw)

    monkeypatch.setattr(ddpo.process, "step", spy)
    ddpo.Method(ctx).step()
    timesteps = set_timesteps(ctx.pipe.scheduler, 3)
    assert len(seen) == 2 and all(int(t.reshape(-1)[0]) == int(timesteps[1]) for t in seen)  # 2 minibatches x 1 step


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "ddpo.samples_per_step=4", "ddpo.sample_batch_size=2", "ddpo.train_batch_size=2", "ddpo.grad_accum=1",
        "sampler.eta=1.0", "ddpo.lr=0.01", "ddpo.stat_min_count=2", "reward=jpeg-compressibility",
        "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0"]
    assert_resumes_to_the_same_run("ddpo", args, tmp_path)
