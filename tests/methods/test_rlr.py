"""RLR, the paper's estimator (methods/rlr.py): its three terms against exact gradients of the analytic chain (the
same estimator functions the method runs), their variances, the method's terms on a real UNet against backprop, a
run that repeats and resumes, bad input."""
import math
import os

import pytest
import torch
from analytic_chain import LinearGaussianChain
from conftest import LinearReward, assert_resumes_to_the_same_run, error_line, leading_lora_context, small_run_args

from bench.core.config import resolve
from diffalign import ddim, sampling
from diffalign.errors import BenchError
from methods import rlr
from rewards import get_reward

# ---- the analytic chain seen as an RLR chain ----------------------------------------------------------

class AnalyticChain:
    """LinearGaussianChain with parameters theta in every step, in the interface rlr's estimator takes."""

    def __init__(self, chain: LinearGaussianChain, theta: torch.Tensor, n: int, generator: torch.Generator):
        self.c, self.num_steps, self.n, self.g = chain, chain.T, n, generator
        self.theta = theta.clone().requires_grad_(True)
        self.params = [self.theta]

    def rollout(self) -> rlr.Rollout:
        c, th = self.c, self.theta.detach()
        xs = c.sample(th, self.n, self.g)
        noises = [(xs[k + 1] - c.mean(k, xs[k], th)) / c.sigma[k] for k in range(c.T)]
        return rlr.Rollout(xs, noises, c.reward(xs[-1]))

    def std(self, k):
        return self.c.sigma[k]

    def step_mean(self, k, x):
        return self.c.mean(k, x, self.theta)

    def reward(self, x):
        return self.c.reward(x)

    @torch.no_grad()
    def replay_rewards(self, ro, steps, u, scale):
        x = ro.xs[min(steps)]
        for k in range(min(steps), self.num_steps):
            th = self.theta + scale * u[0] if k in steps else self.theta
            x = self.c.mean(k, x, th) + self.c.sigma[k] * ro.noises[k]
        return self.c.reward(x)


# d = 3 noise dimensions, p = 8 parameters: more parameters than noise dimensions, the regime of a LoRA
# (tiny world: 28,672 LoRA weights, 3,072 pixels), where the paper's variance ordering is claimed.
D, P, T, H, BATCH = 3, 8, 6, 2, 8
THETA = 0.3 * torch.ones(P, dtype=torch.float64)
Q = torch.softmax(0.4 * torch.arange(T - H, dtype=torch.float64), 0)  # a non-uniform window distribution


def _estimates(n_est: int, seed: int):
    chain = LinearGaussianChain(d=D, p=P, T=T)
    g = torch.Generator().manual_seed(seed)
    out = {k: [] for k in ("first_order", "half_order", "zeroth_order", "sum")}
    for _ in range(n_est):
        ac = AnalyticChain(chain, THETA, BATCH, g)
        start = int(torch.multinomial(Q, 1, generator=g))
        est = rlr.rlr_estimate(ac, ac.rollout(), start, H, zo_samples=2, zo_eps=1e-3, generator=g)
        for k, v in est["terms"].items():
            out[k].append(v[0])
        out["sum"].append(sum(v[0] for v in est["terms"].values()))
    return chain, {k: torch.stack(v) for k, v in out.items()}


def _targets(chain):
    """Each term's exact mean: its steps' contributions, averaged over the window distribution."""
    contrib = chain.step_contributions(THETA)
    ho = sum(Q[j] * sum(contrib[k] for k in rlr.step_sets(T, j, H)[0]) for j in range(T - H))
    zo = sum(Q[j] * sum(contrib[k] for k in rlr.step_sets(T, j, H)[1]) for j in range(T - H))
    return {"first_order": contrib[T - 1], "half_order": ho, "zeroth_order": zo, "sum": chain.exact_gradient(THETA)}


def test_rlr_terms_and_their_sum_are_unbiased_and_variances_order_fo_ho_zo():
    chain, est = _estimates(1000, seed=1)
    targets = _targets(chain)
    figures = {}
    for name, v in est.items():
        mean, se = v.mean(0), v.std(0) / math.sqrt(len(v))
        figures[name] = (mean, se, float(v.var(0).sum()))
        assert ((mean - targets[name]).abs() < 3 * se).all(), (name, mean, targets[name], se)
    # the test can see a wrong gradient: the sum's standard error is small against the gradient
    assert float(figures["sum"][1].norm()) < 0.1 * float(targets["sum"].norm())
    # the three sets add up: the three exact targets sum to the exact gradient
    assert torch.allclose(targets["first_order"] + targets["half_order"] + targets["zeroth_order"], targets["sum"])
    var = {k: f[2] for k, f in figures.items()}
    print("\nRLR terms on the analytic chain (d=3, p=8, T=6, h=2, batch 8, 1000 estimates):")
    for k, (mean, se, v) in figures.items():
        print(f"  {k:13s} |mean| {float(mean.norm()):.4f}  |target| {float(targets[k].norm()):.4f}  "
              f"max|z| {float(((mean - targets[k]) / se).abs().max()):.2f}  var (trace) {v:.4g}")
    assert var["first_order"] < var["half_order"] < var["zeroth_order"], var


def test_the_same_step_estimated_three_ways_orders_fo_ho_zo():
    """Like for like: the last step's own contribution by backprop (FO), by the likelihood ratio of its
    noise (HO, h = 1) and by a two-point parameter perturbation (ZO); all unbiased.  ZO's variance grows
    with the number of parameters, HO's with the noise dimension / sigma^2: with p = 24 (p/d = 8, about the
    tiny world's LoRA/pixel ratio of 9.3) HO < ZO; with p = 8 the last step's HO (sigma = 0.3) is the
    noisier one (measured: FO 0.19, HO 60.6, ZO 23.7)."""
    p = 24
    theta = 0.3 * torch.ones(p, dtype=torch.float64)
    chain = LinearGaussianChain(d=D, p=p, T=T)
    target = chain.step_contributions(theta)[T - 1]
    g = torch.Generator().manual_seed(2)
    fo, ho, zo = [], [], []
    for _ in range(1500):
        ac = AnalyticChain(chain, theta, BATCH, g)
        ro = ac.rollout()
        fo.append(rlr.gradient(rlr.first_order_surrogate(ac, ro), ac.params)[0])
        ho.append(rlr.gradient(rlr.half_order_surrogate(ac, ro, T - 1, 1), ac.params)[0])
        zo.append(rlr.zeroth_order_estimate(ac, ro, [T - 1], 2, 1e-3, g)[0][0])
    var = {}
    for name, v in (("first_order", fo), ("half_order", ho), ("zeroth_order", zo)):
        v = torch.stack(v)
        se = v.std(0) / math.sqrt(len(v))
        assert ((v.mean(0) - target).abs() < 3 * se).all(), (name, v.mean(0), target, se)
        var[name] = float(v.var(0).sum())
    print("\nlast step's contribution, three estimators (trace of the covariance):", var)
    assert var["first_order"] < var["half_order"] < var["zeroth_order"], var


def test_each_window_is_unbiased_on_its_own():
    """Conditional on j the HO term estimates exactly its window's steps (so no 1/q(j) weight is needed)."""
    chain = LinearGaussianChain(d=D, p=P, T=T)
    contrib = chain.step_contributions(THETA)
    g = torch.Generator().manual_seed(3)
    for start in range(T - H):
        v = []
        for _ in range(300):
            ac = AnalyticChain(chain, THETA, 32, g)
            v.append(rlr.gradient(rlr.half_order_surrogate(ac, ac.rollout(), start, H), ac.params)[0])
        v = torch.stack(v)
        target = contrib[start] + contrib[start + 1]
        se = v.std(0) / math.sqrt(len(v))
        assert ((v.mean(0) - target).abs() < 3.5 * se).all(), (start, v.mean(0), target, se)


def test_window_distribution_step_sets_and_memory_rule():
    assert torch.allclose(rlr.window_probs([None, None, None], "softmax-gradnorm"), torch.full((3,), 1 / 3,
                                                                                             dtype=torch.float64))
    q = rlr.window_probs([1.0, 2.0, None], "softmax-gradnorm")
    assert q[1] > q[2] > q[0] and float(q.sum()) == pytest.approx(1.0)
    # unit-free: the same probabilities whatever the gradient's scale
    assert torch.allclose(q, rlr.window_probs([1e-3, 2e-3, None], "softmax-gradnorm"))
    assert torch.allclose(rlr.window_probs([1.0, 5.0], "uniform"), torch.tensor([0.5, 0.5], dtype=torch.float64))
    window, zo = rlr.step_sets(10, 3, 2)
    assert window == [3, 4] and zo == [0, 1, 2, 5, 6, 7, 8]
    assert rlr.step_sets(10, 3, 2, first_order=False)[1] == [0, 1, 2, 5, 6, 7, 8, 9]
    # the paper's setting: SD 1.4, T = 50, B_h = 8 GB, B_z = 0.24 GB, a 30 GB budget -> h = 2
    assert rlr.choose_h(50, 30000, 8000, 240) == 2
    assert rlr.choose_h(50, 1e9, 8000, 240) == 24  # the variance bound T/2 - 1
    assert rlr.choose_h(10, 100, 8000, 240) == 1   # never below one step


# ---- the replay sampler (diffalign/sampling.py) ------------------------------------------------------------

PROMPTS = ["a red circle", "two blue squares"]


# ---- the method's chain on a real UNet ---------------------------------------------------------------


def test_method_terms_on_a_unet_match_backprop(small_pixel_pipeline_dir):
    """FO = AlignProp K = 1's gradient; HO (h = 1) = the step's log-prob term; ZO's finite difference =
    the pathwise derivative of the perturbed steps along u (float64, same noise)."""
    ctx = leading_lora_context(small_pixel_pipeline_dir, "rlr", ["sampler.num_steps=4", "rlr.h=1"], dtype=torch.float64)
    chain = rlr.DiffusionChain(ctx, PROMPTS, checkpointing=True)
    x_T = sampling.initial_noise(ctx.pipe, 2, torch.Generator().manual_seed(11)).double()
    ctx.generator.manual_seed(13)
    ro = chain.rollout(x_T)
    fo = rlr.gradient(rlr.first_order_surrogate(chain, ro), chain.params)

    def pathwise(mask):
        images = sampling.sample_with_grad(ctx.pipe, PROMPTS, x_T, 4, 3.0, 1.0, grad_mask=mask,
                                           generator=torch.Generator().manual_seed(13))
        return rlr.gradient(ctx.reward(images, PROMPTS).mean(), chain.params)

    ref = pathwise([False, False, False, True])
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-12) for a, b in zip(fo, ref))
    assert max(float(a.abs().max()) for a in fo) > 0
    # HO with h = 1 at step 1: (R - b) x the gradient of the step's true log-density
    ho = rlr.gradient(rlr.half_order_surrogate(chain, ro, 1, 1), chain.params)
    eps = sampling.guided_eps(ctx.pipe.unet, ro.xs[1], chain.timesteps[1], chain.cond, chain.uncond, 3.0)
    lp = ddim.ddim_step(ctx.pipe.scheduler, eps, int(chain.timesteps[1]), ro.xs[1], 4, 1.0, prev=ro.xs[2],
                        reduction="sum").log_prob
    adv = ro.rewards - rlr.leave_one_out_mean(ro.rewards)
    ref = rlr.gradient((adv * lp).mean(), chain.params)
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-12) for a, b in zip(ho, ref))
    # ZO on every step: the central difference along u is u . (the full pathwise gradient).  (A subset of
    # steps has no backprop reference here: a masked step also drops its UNet's Jacobian in x.)
    zo, diffs = rlr.zeroth_order_estimate(chain, ro, [0, 1, 2, 3], 1, 1e-5, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    u = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in chain.params]
    path = pathwise(None)
    assert diffs[0] == pytest.approx(float(sum((a * b).sum() for a, b in zip(u, path))), rel=1e-5)
    assert ctx.costs.images == 2 + 2 * 2  # the rollout and the two perturbed replays


def test_non_differentiable_reward_refused_or_last_step_goes_zeroth_order(small_pixel_pipeline_dir):
    jpeg = get_reward("jpeg-compressibility")
    with pytest.raises(BenchError, match="not differentiable; accepted: a differentiable reward, or rlr.first_order"):
        rlr.Method(leading_lora_context(small_pixel_pipeline_dir, "rlr", ["sampler.num_steps=3"], reward=jpeg))
    scalar = LinearReward((3, 8, 8), torch.float32)
    scalar.differentiable = False  # used as a black box: no gradient is asked of it
    ctx = leading_lora_context(small_pixel_pipeline_dir, "rlr", ["sampler.num_steps=3", "sampler.eta=1.0", "rlr.h=1",
                                                     "rlr.first_order=false", "rlr.batch_size=2",
                                                     "rlr.zo_samples=1"], reward=scalar)
    out = rlr.Method(ctx).step()
    assert "fo_norm" not in out and out["zo_norm"] > 0 and out["ho_norm"] > 0


def test_variant_names():
    paper = ["rlr.ho_weight=1", "rlr.zo_weight=1", "rlr.zo_samples=2"]  # the preset down-weights HO and ZO
    assert rlr.variant(resolve("rlr", paper)) == "rlr/h=2/j=softmax-gradnorm/zo=2x"
    assert rlr.variant(resolve("rlr")) == "rlr/h=2/j=softmax-gradnorm/zo=1x/weights(ho=0.002,zo=0.0002)"
    assert rlr.variant(resolve("rlr", paper + ["rlr.memory_budget_mb=30000", "sampler.num_steps=50"])) == \
        "rlr/h=2(budget=30000MB)/j=softmax-gradnorm/zo=2x"
    assert rlr.variant(resolve("rlr", paper + ["rlr.first_order=false", "rlr.j_dist=uniform", "rlr.zo_weight=0.1"])) \
        == "rlr/h=2/j=uniform/zo=2x/weights(ho=1,zo=0.1)/no-fo"


# ---- runs: determinism, resume after a kill, bad input ------------------------------------------------

RUN_ARGS = ["rlr.batch_size=2", "rlr.h=1", "rlr.zo_samples=1", "rlr.lr=0.01", "sampler.num_steps=3", "sampler.eta=1.0"]


@pytest.mark.slow
def test_runs_repeat_and_resume_after_a_kill(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + ["eval.kl_seeds=0"] + RUN_ARGS
    a, manifest = assert_resumes_to_the_same_run("rlr", args, tmp_path)
    assert manifest["variant"] == rlr.variant(resolve("rlr", args))
    assert a["reward_mean"].iloc[1:].nunique() == 4 and (a["grad_norm"].iloc[1:] > 0).all()  # it really trains


def test_bad_input_gives_one_clear_line(capsys, tmp_path, small_pixel_pipeline_dir):
    out = str(tmp_path / "run")
    base = ["run", "--out", out, "--set", f"model={small_pixel_pipeline_dir}"]
    cases = [
        (["--method", "rlr", "rlr.h=10"], "rlr.h = 10; accepted: 1..sampler.num_steps - 1 (9)"),
        (["--method", "rlr", "rlr.j_dist=greedy"], "'rlr.j_dist' = 'greedy'; accepted: softmax-gradnorm, uniform"),
        (["--method", "rlr", "sampler.eta=0"], "accepted: eta > 0"),
        (["--method", "rlr", "rlr.chain_len=3"], "unknown config key 'rlr.chain_len'; accepted: rlr.adam_betas"),
        (["--method", "rlr", "--reward", "jpeg-compressibility"], "rlr.first_order=false"),
    ]
    for argv, expected in cases:
        assert expected in error_line(capsys, base + argv), argv
        assert not os.path.exists(out), argv
