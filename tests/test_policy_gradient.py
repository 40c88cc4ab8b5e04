"""DDPO and DPOK: estimators against the exact gradient of an analytic chain, log-probs, KL, ratios."""
import math

import pytest
import torch

from analytic_chain import LinearGaussianChain
from bench import sampling
from bench.config import resolve
from bench.errors import BenchError
from methods import ddpo


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
        lp = sampling.gaussian_log_prob(xs[k + 1], chain.mean(k, xs[k], th), chain.sigma[k], "sum")
        step_loss, ratio = ddpo.policy_loss(lp, lp.detach(), adv, estimator, clip_range=1e-4)
        assert torch.equal(ratio, torch.ones_like(ratio))
        loss = loss + step_loss
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


def test_ppo_clip_stops_the_gradient_outside_the_band():
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    old = torch.tensor([0.0, -0.5, 0.5, 0.0])  # ratios 1, e^0.5, e^-0.5, 1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, ratio = ddpo.policy_loss(lp, old, adv, "is", clip_range=0.2)
    loss.backward()
    # clipped where the ratio has moved past the band in the advantage's direction
    assert lp.grad.tolist() == pytest.approx([-0.25, 0.0, 0.0, 0.25])


def test_gaussian_kl_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    mp, mq = torch.randn(3, 2, 4, generator=g), torch.randn(3, 2, 4, generator=g)
    std = torch.tensor([0.5, 1.0, 2.0])
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mp, std.view(3, 1, 1).expand_as(mp)),
        torch.distributions.Normal(mq, std.view(3, 1, 1).expand_as(mq))).flatten(1)
    assert torch.allclose(sampling.gaussian_kl(mp, mq, std, "sum"), ref.sum(1), atol=1e-6)
    assert torch.allclose(sampling.gaussian_kl(mp, mq, std, "mean"), ref.mean(1), atol=1e-6)


def test_per_prompt_stat_tracker():
    from bench.advantages import PerPromptStatTracker

    tr = PerPromptStatTracker(buffer_size=4, min_count=3)
    a = tr.update(["x", "x", "y"], torch.tensor([1.0, 3.0, 5.0]))
    # too few per prompt: batch statistics (population std)
    batch = torch.tensor([1.0, 3.0, 5.0])
    assert torch.allclose(a, (batch - batch.mean()) / (batch.std(unbiased=False) + 1e-6))
    a = tr.update(["x", "x"], torch.tensor([5.0, 7.0]))  # x has 4 now: its own buffer [1,3,5,7]
    buf = torch.tensor([1.0, 3.0, 5.0, 7.0])
    assert torch.allclose(a, (torch.tensor([5.0, 7.0]) - buf.mean()) / (buf.std(unbiased=False) + 1e-6))
    tr.update(["x"], torch.tensor([9.0]))
    assert list(tr.stats["x"]) == [3.0, 5.0, 7.0, 9.0]  # bounded buffer keeps the newest


def _context(pipe_dir, method, overrides):
    import accelerate

    from bench.config import Config
    from bench.costs import Costs
    from bench.harness import Context
    from bench.lora import add_lora
    from bench.pipeline import load_pipeline
    from rewards import get_reward

    key = "dpok" if method == "dpok" else "ddpo"
    every_step = [f"{key}.skip_first_steps=0", f"{key}.skip_last_steps=0"]  # the presets skip 2 of 10 steps
    cfg = resolve(method, ["model=x", "sampler.num_steps=3"] + every_step + overrides)
    cfg = Config({**cfg, "method_key": "ddpo" if method.startswith("ddpo") else method})
    pipe = load_pipeline(pipe_dir)
    params = add_lora(pipe.unet, 4, 4.0, seed=0)
    return Context(cfg=cfg, pipe=pipe, reward=get_reward("jpeg-incompressibility"),
                   train_prompts=["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0),
                   costs=Costs(), accelerator=accelerate.Accelerator(cpu=True), trainable=params)


@pytest.mark.parametrize("method", ["ddpo", "ddpo-sf"])
def test_importance_ratio_is_exactly_one_before_the_first_update(small_pixel_pipeline_dir, monkeypatch, method):
    ctx = _context(small_pixel_pipeline_dir, method, ["ddpo.samples_per_step=4", "ddpo.sample_batch_size=2",
                                                       "ddpo.train_batch_size=2", "ddpo.grad_accum=2",
                                                       "ddpo.timestep_fraction=1.0"])
    m = ddpo.Method(ctx)
    seen = []
    real = ddpo.policy_loss

    def spy(lp, old, adv, est, clip):
        loss, ratio = real(lp, old, adv, est, clip)
        seen.append(ratio.detach().clone())
        return loss, ratio

    monkeypatch.setattr(ddpo, "policy_loss", spy)
    metrics = m.step()  # a single optimizer update, after every stored step has been scored
    ratios = torch.cat(seen)
    assert len(ratios) == 4 * 3  # every stored (sample, step)
    assert torch.equal(ratios, torch.ones_like(ratios)), (ratios - 1).abs().max()
    assert metrics["clipfrac"] == 0 and metrics["updates"] == 1
    assert ctx.costs.images == 4 and ctx.costs.reward_queries == 4


def test_skipped_steps_are_left_out_of_training(small_pixel_pipeline_dir, monkeypatch):
    from methods import dpok

    ctx = _context(small_pixel_pipeline_dir, "ddpo-sf", ["ddpo.samples_per_step=4", "ddpo.sample_batch_size=2",
                                                          "ddpo.train_batch_size=2", "ddpo.grad_accum=2",
                                                          "ddpo.skip_first_steps=1", "ddpo.skip_last_steps=1"])
    assert ddpo.variant(ctx.cfg).endswith("/steps-1:2-of-3")
    seen = []
    real = ddpo.ddim_step

    def spy(scheduler, eps, t, x_t, *args, **kw):
        if kw.get("prev") is not None:  # the training phase's recomputed step
            seen.append(t)
        return real(scheduler, eps, t, x_t, *args, **kw)

    monkeypatch.setattr(ddpo, "ddim_step", spy)
    ddpo.Method(ctx).step()
    timesteps = sampling.set_timesteps(ctx.pipe.scheduler, 3)
    assert len(seen) == 2 and all(int(t.reshape(-1)[0]) == int(timesteps[1]) for t in seen)  # 2 minibatches x 1 step

    ctx = _context(small_pixel_pipeline_dir, "dpok", ["dpok.g_batch=2", "dpok.p_step=1", "dpok.p_batch=2",
                                                       "dpok.grad_accum=1", "dpok.skip_last_steps=2"])
    m = dpok.Method(ctx)
    m.step()
    assert m.buffer["t_index"].tolist() == [0, 0] and len(m.buffer["x_t"]) == 2
    with pytest.raises(BenchError, match="leave at least one"):
        resolve("dpok", ["dpok.skip_first_steps=1", "dpok.skip_last_steps=9"])


def test_dpok_kl_penalty_is_zero_at_the_base_model_and_grows(small_pixel_pipeline_dir):
    from methods import dpok

    ctx = _context(small_pixel_pipeline_dir, "dpok", ["dpok.g_batch=2", "dpok.p_step=1", "dpok.p_batch=2",
                                                       "dpok.grad_accum=1", "dpok.lr=0.05", "dpok.baseline=value"])
    x_T = sampling.initial_noise(ctx.pipe, 2, torch.Generator().manual_seed(0))

    def kl_now():
        return sampling.kl_to_base(ctx.pipe, ["a red circle"] * 2, x_T, 3, 3.0, 1.0, torch.Generator().manual_seed(1))

    assert torch.equal(kl_now(), torch.zeros(2, dtype=torch.float64))  # LoRA starts at B = 0: the base model
    m = dpok.Method(ctx)
    first = m.step()
    assert first["kl_penalty"] == 0.0 and first["ratio_mean"] == 1.0
    second = m.step()
    assert second["kl_penalty"] > 0 and math.isfinite(second["value_loss"])
    assert (kl_now() > 0).all()
