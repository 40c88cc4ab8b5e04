"""RLR: the paper's three terms against exact gradients of the analytic chain (the same estimator
functions the method runs), their variances, the shared replay sampler, the method's terms on a real
UNet against backprop, rlr-code against AlignProp K = 1, runs that repeat and resume, bad input."""
import json
import math
import os

import pandas as pd
import pytest
import torch

from analytic_chain import LinearGaussianChain
from bench import cli, sampling
from bench.config import resolve
from bench.errors import BenchError
from conftest import run_killed_and_resumed
from methods import rlr


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


# ---- the replay sampler (bench/sampling.py) ------------------------------------------------------------

PROMPTS = ["a red circle", "two blue squares"]


def test_replay_chain_reproduces_the_sampler_and_perturbs_only_the_given_steps(small_pixel_pipeline):
    pipe = small_pixel_pipeline
    from bench.lora import add_lora

    params = add_lora(pipe.unet, seed=0)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x_T = sampling.initial_noise(pipe, 2, torch.Generator().manual_seed(0))
    traj = sampling.sample(pipe, PROMPTS, x_T, 3, 3.0, 1.0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noises = [sampling.step_noise(x_T, g) for _ in range(3)]
    cond, uncond = sampling.embed(pipe, PROMPTS, 3.0)
    xs = sampling.replay_chain(pipe, x_T, noises, cond, uncond, 3, 3.0, 1.0)
    assert torch.allclose(torch.stack(xs, 1), traj.latents[:, 1:], atol=1e-6)
    # from the middle, the same
    assert torch.allclose(sampling.replay_chain(pipe, xs[0], noises, cond, uncond, 3, 3.0, 1.0, start=1)[-1], xs[-1],
                          atol=1e-6)
    g = torch.Generator().manual_seed(2)
    u = [torch.randn(p.shape, generator=g) for p in params]
    before = [p.detach().clone() for p in params]
    pert = sampling.replay_chain(pipe, x_T, noises, cond, uncond, 3, 3.0, 1.0, perturb_steps=[1], params=params,
                                 direction=u, scale=0.5)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # restored exactly
    assert torch.equal(pert[0], xs[0]) and not torch.allclose(pert[1], xs[1])  # step 0 untouched, step 1 moved
    with sampling.perturbed(params, u, 0.5):  # the same as running step 1 with the moved weights
        manual = sampling.replay_chain(pipe, xs[0], noises, cond, uncond, 3, 3.0, 1.0, start=1)[0]
    assert torch.allclose(pert[1], manual, atol=1e-6)


# ---- the method's chain on a real UNet ---------------------------------------------------------------

class LinearReward:
    name, differentiable = "linear", True

    def __init__(self, shape, dtype):
        self.w = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)

    def __call__(self, images, prompts):
        return (images * self.w).flatten(1).sum(1)


def _context(pipe_dir, method, overrides, dtype=torch.float32, reward=None):
    import accelerate
    from diffusers import DDIMScheduler

    from bench.config import Config
    from bench.costs import Costs
    from methods import get_method
    from bench.harness import Context
    from bench.lora import add_lora
    from bench.pipeline import load_pipeline

    cfg = resolve(method, ["model=x"] + overrides)
    cfg = Config({**cfg, "method_key": get_method(method).NAME_KEY})
    pipe = load_pipeline(pipe_dir, dtype=dtype)
    # leading spacing: trailing's t = 999 first step puts x0 clipping kinks inside finite differences
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "timestep_spacing": "leading",
                                                "steps_offset": 1})
    params = add_lora(pipe.unet, 2, 2.0, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return Context(cfg=cfg, pipe=pipe, reward=reward or LinearReward((3, 8, 8), dtype), train_prompts=PROMPTS,
                   generator=torch.Generator().manual_seed(0), costs=Costs(),
                   accelerator=accelerate.Accelerator(cpu=True), trainable=params)


def test_method_terms_on_a_unet_match_backprop(small_pixel_pipeline_dir):
    """FO = AlignProp K = 1's gradient; HO (h = 1) = the step's log-prob term; ZO's finite difference =
    the pathwise derivative of the perturbed steps along u (float64, same noise)."""
    ctx = _context(small_pixel_pipeline_dir, "rlr", ["sampler.num_steps=4", "rlr.h=1"], dtype=torch.float64)
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
    lp = sampling.ddim_step(ctx.pipe.scheduler, eps, int(chain.timesteps[1]), ro.xs[1], 4, 1.0, prev=ro.xs[2],
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


def test_rlr_code_with_chain_len_zero_is_alignprop_k1(small_pixel_pipeline_dir):
    from methods import alignprop

    common = ["sampler.num_steps=3", "sampler.eta=0.0"]
    a = _context(small_pixel_pipeline_dir, "rlr-code", common + ["rlr.chain_len=0", "rlr.batch_size=2",
                                                                   "rlr.loss_coeff=0.01", "rlr.grad_clip=5.0"])
    b = _context(small_pixel_pipeline_dir, "alignprop", common + ["alignprop.truncation=last_k", "alignprop.k=1",
                                                                   "alignprop.k_dist=fixed", "alignprop.batch_size=2",
                                                                   "alignprop.weight_decay=1e-4"])
    rlr.Method(a).step()
    alignprop.Method(b).step()
    assert all(torch.allclose(p, q, atol=1e-7) for p, q in zip(a.trainable, b.trainable))
    assert a.costs.images == b.costs.images == 2


def test_rlr_code_step_makes_one_plus_chain_len_updates(small_pixel_pipeline_dir):
    ctx = _context(small_pixel_pipeline_dir, "rlr-code", ["sampler.num_steps=3", "rlr.chain_len=3",
                                                          "rlr.batch_size=2"])
    m = rlr.Method(ctx)
    out = m.step()
    assert out["updates"] == 4 and m.opt.state_dict()["state"][0]["step"] == 4
    assert math.isfinite(out["reward_mean"]) and 0 <= out["ho_zeroed"] <= 3


def test_non_differentiable_reward_refused_or_last_step_goes_zeroth_order(small_pixel_pipeline_dir):
    from rewards import get_reward

    jpeg = get_reward("jpeg-compressibility")
    for method in ("rlr", "rlr-code"):
        with pytest.raises(BenchError, match="not differentiable"):
            rlr.Method(_context(small_pixel_pipeline_dir, method, ["sampler.num_steps=3"], reward=jpeg))
    scalar = LinearReward((3, 8, 8), torch.float32)
    scalar.differentiable = False  # used as a black box: no gradient is asked of it
    ctx = _context(small_pixel_pipeline_dir, "rlr", ["sampler.num_steps=3", "sampler.eta=1.0", "rlr.h=1",
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
    assert rlr.variant(resolve("rlr-code")) == "rlr-code/chain_len=2/ho_coeff=0.001/clip=0.0001/logprob-mean"


# ---- runs: determinism, resume after a kill, bad input ------------------------------------------------

RUN_ARGS = {
    "rlr": ["rlr.batch_size=2", "rlr.h=1", "rlr.zo_samples=1", "rlr.lr=0.01", "sampler.num_steps=3",
            "sampler.eta=1.0"],
    "rlr-code": ["rlr.batch_size=2", "rlr.chain_len=2", "rlr.lr=0.01", "sampler.num_steps=3", "sampler.eta=1.0"],
}
VOLATILE = ["wall_time", "peak_mem_mb"]


def _metrics(run_dir):
    return pd.read_parquet(os.path.join(run_dir, "metrics.parquet"))


@pytest.mark.parametrize("method", sorted(RUN_ARGS))
def test_runs_repeat_and_resume_after_a_kill(small_pixel_pipeline_dir, tmp_path, method):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    args = [f"model={small_pixel_pipeline_dir}", f"eval_prompts={prompts}", "steps=4", "checkpoint_every=2",
            "eval.every=2", "eval.grid_every=2", "eval.num_seeds=2", "eval.num_steps=2", "eval.kl_seeds=0",
            "threads=2"] + RUN_ARGS[method]
    full, killed = run_killed_and_resumed(method, args, tmp_path)
    a, b = _metrics(full).drop(columns=VOLATILE), _metrics(killed).drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(a, b)  # same seed, another process, killed and resumed: the same run
    manifest = json.load(open(os.path.join(killed, "manifest.json")))
    assert manifest["status"] == "complete" and manifest["variant"] == rlr.variant(resolve(method, args))
    assert manifest["resumes"][0]["from_step"] == 2
    assert a["reward_mean"].iloc[1:].nunique() == 4 and (a["grad_norm"].iloc[1:] > 0).all()  # it really trains


def test_bad_input_gives_one_clear_line(capsys, tmp_path, small_pixel_pipeline_dir):
    out = str(tmp_path / "run")
    base = ["run", "--out", out, "--set", f"model={small_pixel_pipeline_dir}"]
    cases = [
        (["--method", "rlr", "rlr.h=10"], "rlr.h = 10; accepted: 1..sampler.num_steps - 1 (9)"),
        (["--method", "rlr", "rlr.j_dist=greedy"], "rlr.j_dist 'greedy'; accepted: softmax-gradnorm, uniform"),
        (["--method", "rlr", "sampler.eta=0"], "accepted: eta > 0"),
        (["--method", "rlr", "rlr.chain_len=3"], "rlr.chain_len is a setting of method 'rlr-code', not 'rlr'"),
        (["--method", "rlr-code", "rlr.h=3"], "rlr.h is a setting of method 'rlr', not 'rlr-code'"),
        (["--method", "rlr-code", "rlr.logprob_reduction=max"], "accepted: mean, sum"),
        (["--method", "rlr", "--reward", "jpeg-compressibility"], "rlr.first_order=false"),
        (["--method", "rlr-code", "--reward", "jpeg-compressibility"], "is not differentiable"),
    ]
    for argv, expected in cases:
        code = cli.main(base + argv)
        err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
        assert code == 2 and len(err) == 1 and expected in err[0], (argv, err)
        assert not os.path.exists(out), argv
