"""GRPO (methods/grpo.py) and its variants flow-grpo, flow-grpo-fast, dance-grpo, mix-grpo: the loss against a hand
computation, the closed-form KL against a direct and a Monte Carlo one, the importance ratios at the first inner step
(exactly 1 on-policy), which steps are stochastic and trained in each round, DanceGRPO's shared noise, zero-spread
groups, the one-line refusals; every variant two steps through the harness on the small DDPM pipeline and on a tiny
random-weight flow folder; a mix-grpo run killed and resumed (its window's clock is checkpointed)."""
import json
import math
import os

import pytest
import torch
from conftest import assert_resumes_to_the_same_run, method_context, metrics_of, small_run_args

from bench import cli
from bench.core.config import resolve
from diffalign import process
from diffalign.errors import BenchError
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from diffalign.sampling import base_model, embed, guided_eps, sample
from methods import grpo
from rewards import get_reward

VARIANTS = ["flow-grpo", "flow-grpo-fast", "dance-grpo", "mix-grpo"]
PIPES = ["small_pixel_pipeline_dir", "flow_pipeline_dir"]
# 2 prompts x groups of 4, sampled 4 at a time and trained in minibatches of 4 (the same UNet batch shape: on the CPU
# a convolution's result can depend on the batch size, by a unit in the last place), one update each: two a round
SMALL = ["grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.sample_batch_size=4", "grpo.train_batch_size=4",
         "grpo.grad_accum=1"]
# each variant on 4 sampler steps (flow-grpo: 3, its evaluation 4: denoising reduction), windows of 2
OWN = {"flow-grpo": ["sampler.num_steps=3", "eval.num_steps=4"],
       "flow-grpo-fast": ["sampler.num_steps=4", "eval.num_steps=4"],
       "dance-grpo": ["sampler.num_steps=4", "eval.num_steps=4"],
       "mix-grpo": ["sampler.num_steps=4", "eval.num_steps=4", "grpo.sde_window=2", "grpo.window_every=1"]}


def _context(pipe_dir, method, overrides, reward=None, lora_scale=0.0):
    cfg = resolve(method, ["model=x", "reward=saturation"] + OWN[method] + SMALL + overrides)
    pipe = load_pipeline(pipe_dir)
    params = add_lora(pipe.unet, 4, 4.0, seed=0)
    if lora_scale:
        with torch.no_grad():
            g = torch.Generator().manual_seed(5)
            for p in params:
                p.copy_(lora_scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return method_context(cfg, pipe, params, reward or get_reward("saturation"))


# ---- the loss and the KL ------------------------------------------------------------------------------------------

def test_the_loss_equals_the_hand_computation():
    lp = torch.tensor([0.0, 0.1, -0.2, 0.0])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, 2.0])
    kl = torch.tensor([0.1, 0.2, 0.3, 0.4])
    # rho = 1, e^0.1 = 1.10517, e^-0.2 = 0.81873, 1; clip at 1 -+ 0.05:
    # -min(A rho, A clip(rho)) = -1, -min(1.10517, 1.05) = -1.05, -min(-0.81873, -0.95) = 0.95, -2; mean -0.775
    out = grpo.grpo_loss(lp, old, adv, 0.05)
    assert float(out.loss) == pytest.approx(-0.775, abs=1e-6)
    assert out.clipfrac.tolist() == [0.0, 1.0, 1.0, 0.0]
    # plus beta x the mean KL: 0.5 x 0.25
    assert float(grpo.grpo_loss(lp, old, adv, 0.05, kl, 0.5).loss) == pytest.approx(-0.65, abs=1e-6)
    assert float(grpo.grpo_loss(lp, old, adv, 0.05, kl, 0.0).loss) == pytest.approx(-0.775, abs=1e-6)


@pytest.mark.parametrize("pipe_dir", PIPES)
def test_the_closed_form_kl_equals_a_direct_and_a_monte_carlo_computation(request, pipe_dir):
    """KL(N(mu_theta, s^2 I) || N(mu_ref, s^2 I)) of one sampler step, theta a non-zero LoRA, ref its base model:
    the closed form ||mu_theta - mu_ref||^2 / (2 s^2) (diffalign.process.gaussian_kl, what the method adds) against
    torch.distributions' KL summed over elements, and against E_p[log p - log q] by Monte Carlo."""
    ctx = _context(request.getfixturevalue(pipe_dir), "flow-grpo", [], lora_scale=0.3)
    pipe, T = ctx.pipe, 3
    timesteps = process.set_timesteps(pipe.scheduler, T)
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn((2, *pipe.latent_shape), generator=g)
    cond, uncond = embed(pipe, ["a red circle", "two blue squares"], 3.0)
    t = timesteps[1]
    with torch.no_grad():
        p = process.step(pipe.scheduler, guided_eps(pipe.unet, x_t, t, cond, uncond, 3.0), t, x_t, T, 1.0)
        with base_model(pipe.unet) as base:
            q = process.step(pipe.scheduler, guided_eps(base, x_t, t, cond, uncond, 3.0), t, x_t, T, 1.0)
    std = float(p.std.reshape(-1)[0])
    closed = process.gaussian_kl(p.mean, q.mean, p.std, "sum").double()
    assert bool((closed > 0).all())  # the LoRA moves the mean
    P = torch.distributions.Normal(p.mean.double(), std)
    Q = torch.distributions.Normal(q.mean.double(), std)
    direct = torch.distributions.kl_divergence(P, Q).flatten(1).sum(1)
    assert torch.allclose(closed, direct, rtol=1e-5)
    D = p.mean[0].numel()
    assert torch.allclose(process.gaussian_kl(p.mean, q.mean, p.std, "mean").double(), closed / D, rtol=1e-5)
    # Monte Carlo: x ~ p, the mean of log p(x) - log q(x) over 4000 draws is within 4 SE of the closed form
    x = P.sample((4000,))
    diff = (P.log_prob(x) - Q.log_prob(x)).flatten(2).sum(2)  # (draws, 2)
    mc, se = diff.mean(0), diff.std(0) / math.sqrt(len(diff))
    assert ((mc - closed).abs() < 4 * se).all(), (mc, closed, se)


# ---- the importance ratios at the first inner step ----------------------------------------------------------------

@pytest.mark.parametrize("pipe_dir", PIPES)
@pytest.mark.parametrize("method", VARIANTS)
def test_importance_ratios_are_exactly_one_before_the_first_update(request, pipe_dir, method, monkeypatch):
    ctx = _context(request.getfixturevalue(pipe_dir), method, ["grpo.lr=0.01", "grpo.clip_range=0.2"])
    m = grpo.Method(ctx)
    updates, seen = [0], []
    real_loss, real_step = grpo.grpo_loss, m.opt.step

    def spy(lp, old, adv, clip, kl=None, beta=0.0):
        out = real_loss(lp, old, adv, clip, kl, beta)
        seen.append((updates[0], out.ratio.clone(), None if kl is None else kl.detach().clone()))
        return out

    def counted():
        updates[0] += 1
        return real_step()

    monkeypatch.setattr(grpo, "grpo_loss", spy)
    m.opt.step = counted
    metrics = m.step()
    first = torch.cat([r for u, r, _ in seen if u == 0])
    later = torch.cat([r for u, r, _ in seen if u == 1])
    n_t = math.ceil(ctx.method_cfg.timestep_fraction * (2 if ctx.method_cfg.sde_window else
                                                        ctx.cfg.sampler.num_steps - ctx.method_cfg.skip_last_steps))
    assert len(first) == len(later) == 4 * n_t  # a minibatch of 4 x the kept steps, per update
    assert torch.equal(first, torch.ones_like(first)), (first - 1).abs().max()  # on-policy: exactly 1
    assert not torch.equal(later, torch.ones_like(later))  # after an update the ratios move: the check has teeth
    assert metrics["ratio_first_mean"] == 1.0 and metrics["ratio_first_std"] == 0.0
    assert metrics["ratio_dev_first"] == 0.0 and metrics["updates"] == 2
    if ctx.method_cfg.beta > 0:  # the KL to the base model: 0 while the LoRA is still zero, then positive
        kls = [(u, k) for u, _, k in seen]
        assert all(float(k.abs().max()) == 0.0 for u, k in kls if u == 0)
        assert all(bool((k > 0).all()) for u, k in kls if u == 1) and metrics["kl"] > 0
    else:
        assert all(k is None for _, _, k in seen) and "kl" not in metrics
    assert ctx.costs.images == 8 and ctx.costs.reward_queries == 8


# ---- which steps are stochastic and trained -----------------------------------------------------------------------

def test_the_mix_grpo_window_slides_as_the_preset_says():
    d = resolve("mix-grpo")["grpo"]  # w = 3, stride 1, every 3 rounds, the last of 10 steps never trained
    starts = [grpo.round_steps(10, d, k)[0][0] for k in range(26)]
    assert starts == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6]
    assert grpo.round_steps(10, d, 4) == ([1, 2, 3], [1, 2, 3])  # round 4: SDE and training on steps 1..3
    assert grpo.round_steps(10, d, 25) == ([6, 7, 8], [6, 7, 8])  # clamped: the last step (9) stays an ODE step
    assert "progressive-clamped(start=min(0+1*floor(k/3),6))" in resolve("mix-grpo")["variant"]


def test_the_flow_grpo_fast_window_is_two_steps_drawn_in_the_first_half():
    d = resolve("flow-grpo-fast")["grpo"]  # w = 2, its start uniform in the first half of the 10 steps: 0..3
    assert grpo.window_bounds(10, d) == (0, 5)
    g, again = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    windows = [grpo.round_steps(10, d, k, g) for k in range(200)]
    assert all(sde == trained == [sde[0], sde[0] + 1] for sde, trained in windows)
    starts = [sde[0] for sde, _ in windows]
    assert set(starts) == {0, 1, 2, 3}  # every start of the first half, and no other
    assert starts == [int(torch.randint(0, 4, (1,), generator=again)) for _ in range(200)]  # one draw a round
    # a fixed window sits at the first trainable step; without a window every step is an SDE step
    fixed = {**d, "window_schedule": "fixed", "skip_first_steps": 1}
    assert grpo.round_steps(10, fixed, 7) == ([1, 2], [1, 2])
    flow = resolve("flow-grpo")["grpo"]
    assert grpo.round_steps(5, flow, 0) == ([0, 1, 2, 3, 4], [0, 1, 2, 3])  # the last step sampled, not trained


@pytest.mark.parametrize("pipe_dir", PIPES)
def test_the_method_samples_the_sde_and_trains_only_inside_the_round_window(request, pipe_dir, monkeypatch):
    """mix-grpo on 4 steps, a window of 2 moving every round, the last step never trained: rounds 0, 1, 2 have the
    SDE on steps {0, 1}, {1, 2}, {1, 2} (clamped), the ODE elsewhere (no log-prob), and train exactly those steps."""
    ctx = _context(request.getfixturevalue(pipe_dir), "mix-grpo", [])
    m = grpo.Method(ctx)
    timesteps = process.set_timesteps(ctx.pipe.scheduler, 4).tolist()
    etas, trained = [], []
    real_sample, real_step = grpo.sample, grpo.process.step

    def sample_spy(pipe, prompts, x_T, num_steps, guidance, etas_, **kw):
        traj = real_sample(pipe, prompts, x_T, num_steps, guidance, etas_, **kw)
        etas.append(list(etas_))
        stochastic = [e > 0 for e in etas_]
        assert [bool(torch.isfinite(traj.log_probs[:, i]).all()) for i in range(4)] == stochastic
        assert [bool(torch.isnan(traj.log_probs[:, i]).all()) for i in range(4)] == [not s for s in stochastic]
        return traj

    def step_spy(scheduler, eps, t, x_t, *args, **kw):
        if kw.get("prev") is not None:  # the training phase's recomputed step
            trained[-1].extend(timesteps.index(v) for v in t.reshape(-1).tolist())
        return real_step(scheduler, eps, t, x_t, *args, **kw)

    monkeypatch.setattr(grpo, "sample", sample_spy)
    monkeypatch.setattr(grpo.process, "step", step_spy)
    starts = []
    for _ in range(3):
        trained.append([])
        starts.append(m.step()["sde_window_start"])
    assert starts == [0, 1, 1]
    per_round = [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0]]
    assert etas == [r for r in per_round for _ in range(2)]  # two sampling batches a round
    # every sample trains both steps of its round's window (8 samples x 2 steps), nothing else
    assert [sorted(tr) for tr in trained] == [[0] * 8 + [1] * 8, [1] * 8 + [2] * 8, [1] * 8 + [2] * 8]
    assert m.state_dict()["round"] == 3


@pytest.mark.parametrize("pipe_dir", PIPES)
def test_the_sampler_with_an_eta_per_step_is_the_one_eta_sampler_when_every_eta_is_equal(request, pipe_dir):
    pipe = load_pipeline(request.getfixturevalue(pipe_dir))
    prompts = ["a red circle", "two blue squares"]
    x_T = torch.randn((2, *pipe.latent_shape), generator=torch.Generator().manual_seed(1))
    for eta in (1.0, 0.0):
        a = sample(pipe, prompts, x_T, 3, 3.0, eta, generator=torch.Generator().manual_seed(2))
        b = sample(pipe, prompts, x_T, 3, 3.0, [eta] * 3, generator=torch.Generator().manual_seed(2))
        assert torch.equal(a.latents, b.latents) and torch.equal(a.images, b.images)
        assert torch.equal(a.log_probs.isnan(), b.log_probs.isnan())
        assert torch.equal(a.log_probs.nan_to_num(), b.log_probs.nan_to_num())


# ---- groups: shared noise, zero spread ----------------------------------------------------------------------------

@pytest.mark.parametrize("pipe_dir", PIPES)
def test_dance_grpo_starts_every_sample_of_a_group_from_the_same_noise(request, pipe_dir, monkeypatch):
    starts = {}
    real = grpo.sample

    def spy(pipe, prompts, x_T, *args, **kw):
        traj = real(pipe, prompts, x_T, *args, **kw)
        starts.setdefault(method, []).append((x_T.clone(), traj.latents[:, -1].clone(), list(prompts)))
        return traj

    monkeypatch.setattr(grpo, "sample", spy)
    for method in ("dance-grpo", "flow-grpo"):
        grpo.Method(_context(request.getfixturevalue(pipe_dir), method, [])).step()
    for method, shared in (("dance-grpo", True), ("flow-grpo", False)):
        x_T = torch.cat([x for x, _, _ in starts[method]]).reshape(2, 4, -1)  # 2 groups of 4 (one batch each)
        x_0 = torch.cat([x for _, x, _ in starts[method]]).reshape(2, 4, -1)
        prompts = [p for _, _, ps in starts[method] for p in ps]
        assert prompts[:4] == [prompts[0]] * 4 and prompts[4:] == [prompts[4]] * 4  # a group is one prompt
        for gr in range(2):
            same = [torch.equal(x_T[gr, 0], x_T[gr, i]) for i in range(1, 4)]
            assert same == [shared] * 3, method
            assert not any(torch.equal(x_0[gr, 0], x_0[gr, i]) for i in range(1, 4))  # the step noise differs
        assert not torch.equal(x_T[0, 0], x_T[1, 0])  # groups differ
    assert "/shared-noise/" in resolve("dance-grpo")["variant"] and "/iid-noise/" in resolve("flow-grpo")["variant"]


class ConstantReward:
    name, differentiable = "constant", False

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), 0.25, device=images.device)


def test_a_round_of_equal_rewards_is_all_zero_spread_groups_and_trains_nothing(small_pixel_pipeline_dir):
    ctx = _context(small_pixel_pipeline_dir, "dance-grpo", [], reward=ConstantReward())
    metrics = grpo.Method(ctx).step()
    assert metrics["zero_spread_frac"] == 1.0 and metrics["group_reward_std"] == 0.0
    assert metrics["loss"] == 0.0 and metrics["reward_mean"] == 0.25


# ---- config --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,override,message", [
    ("flow-grpo", "grpo.sde_window=2", "method 'flow-grpo' needs the SDE on every step: grpo.sde_window=0"),
    ("flow-grpo-fast", "grpo.window_schedule=progressive", "method 'flow-grpo-fast' needs an SDE window of 1 or 2"),
    ("dance-grpo", "grpo.beta=0.04", "method 'dance-grpo' needs one initial noise per group and no KL term"),
    ("mix-grpo", "grpo.window_schedule=random", "method 'mix-grpo' needs a sliding SDE window"),
    ("mix-grpo", "grpo.sde_window=10", r"\+ the SDE window \(10\) must fit in the sampler's 10 steps"),
    ("flow-grpo", "grpo.group_size=3", r"\(6 samples\) must be a multiple of sample_batch_size \(8\)"),
    ("flow-grpo", "sampler.eta=0", "policy gradients need a stochastic sampler"),
    ("flow-grpo", "grpo.group_size=1", r"config key 'grpo.group_size' = 1; accepted: an integer in 2\.\.1024"),
])
def test_a_config_that_is_not_the_variant_is_refused_with_one_line(method, override, message):
    with pytest.raises(BenchError, match=message):
        resolve(method, [override])


def test_each_variant_records_its_exact_settings():
    assert resolve("flow-grpo")["variant"] == (
        "flow-grpo/G=8x2-prompts/adv-group(std-ddof0+0.0001,clip=5)/ppo(clip=0.0001,epochs=1)/kl(beta=0.04)/"
        "iid-noise/sde=process(eta=1)/sde-every-step/train-steps-0:4/nfe-train5-eval10/logprob-mean")
    assert resolve("flow-grpo-fast")["variant"].split("/")[6:9] == [
        "sde=process(eta=1)", "sde-window(w=2,start~U{0..3}-per-round)-ode-elsewhere", "train-window"]
    assert "/train-steps-0:9-random-subset(0.6)/" in resolve("dance-grpo")["variant"]
    assert resolve("mix-grpo")["variant"].startswith("mix-grpo/")


# ---- through the harness -------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("pipe_dir", PIPES)
@pytest.mark.parametrize("method", VARIANTS)
def test_each_variant_runs_two_steps_through_the_harness(request, pipe_dir, method, tmp_path):
    out = str(tmp_path / "run")
    args = small_run_args(request.getfixturevalue(pipe_dir), tmp_path) + [
        "steps=2", "eval.every=2", "eval.grid_every=2", "checkpoint_every=2", "reward=saturation", "grpo.lr=0.01",
        "threads=1", *SMALL, *OWN[method]]
    assert cli.main(["run", "--method", method, "--out", out, "--set", *args]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert manifest["status"] == "complete"
    assert summary["model_process"] == ("flow" if pipe_dir == "flow_pipeline_dir" else "ddpm")
    df = metrics_of(out)
    assert df["step"].tolist() == [0, 1, 2] and df["images"].tolist() == [0, 8, 16]
    rows = df.iloc[1:]
    assert (rows["ratio_first_mean"] == 1.0).all() and (rows["ratio_first_std"] == 0.0).all()
    for col in ("reward_mean", "clipfrac", "group_reward_std", "zero_spread_frac", "loss", "ratio_mean"):
        assert rows[col].notna().all(), col
    assert ("kl" in df) == (method in ("flow-grpo", "flow-grpo-fast"))
    assert ("sde_window_start" in df) == (method in ("flow-grpo-fast", "mix-grpo"))
    assert manifest["variant"] == resolve(method, args)["variant"] and manifest["variant"].startswith(method + "/")


@pytest.mark.slow
def test_killed_mix_grpo_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    """The window's clock (rounds done) is in the checkpoint: a run killed after step 3 and resumed has the window
    where the uninterrupted run had it."""
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "reward=saturation", "grpo.lr=0.01", *SMALL, *OWN["mix-grpo"]]
    metrics, _ = assert_resumes_to_the_same_run("mix-grpo", args, tmp_path)
    assert metrics["sde_window_start"].iloc[1:].tolist() == [0, 1, 1, 1]
