"""DiffusionNFT (methods/diffusion_nft.py): the loss against hand computations (uniform and adaptive weighting), its
optimum (v_theta* = v_old + (2r - 1)(v - v_old) / b: r = 1 puts the implicit positive policy on the target), the
optimality probability r against hand numbers (group and global std, the clip, a zero-spread group), one round on a
small DDPM pipeline and a tiny random flow folder (the old policy equals theta before the round's update, then is
soft updated), the variant string; two steps through the harness on the tiny flow world and the small DDPM pipeline,
and a killed run resumed (the old weights and the update clock are checkpointed)."""
import json
import math
import os

import pytest
import torch
from conftest import ROOT, assert_resumes_to_the_same_run, method_context, metrics_of, small_run_args

from bench import cli
from bench.core.config import resolve
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from methods import diffusion_nft as nft
from rewards import get_reward

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = ["nft.group_size=4", "nft.prompts_per_step=2", "sampler.num_steps=3", "nft.lr=0.01"]


def _context(pipe_dir, overrides=(), reward=None):
    cfg = resolve("diffusion-nft", ["model=x", "reward=saturation"] + SMALL + list(overrides))
    pipe = load_pipeline(pipe_dir)
    params = add_lora(pipe.unet, 4, 4.0, seed=0)
    return method_context(cfg, pipe, params, reward or get_reward("saturation"))


# ---- the loss ------------------------------------------------------------------------------------------------------

# two samples of two elements: v_old, v_theta, the target v, r; b = 1/2
V_OLD = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
V_THETA = torch.tensor([[3.0, 2.0], [0.0, 3.0]])
TARGET = torch.tensor([[2.0, 1.0], [1.0, 0.0]])
R = torch.tensor([1.0, 0.25])


def test_the_loss_equals_the_hand_computation():
    # v_plus = 0.5 v_old + 0.5 v_theta:  [2, 1] and [0, 2];   v_minus = 1.5 v_old - 0.5 v_theta:  [0, -1] and [0, 0]
    # sample 1: v_plus - v = [0, 0] -> 0;      v_minus - v = [-2, -2] -> (4 + 4) / 2 = 4;   r = 1:    1 * 0 + 0 * 4
    # sample 2: v_plus - v = [-1, 2] -> 2.5;   v_minus - v = [-1, 0]  -> 0.5;               r = 1/4:  0.625 + 0.375
    out = nft.nft_loss(V_THETA, V_OLD, TARGET, R, beta=0.5, weighting="uniform")
    assert out.pos.tolist() == [0.0, 2.5] and out.neg.tolist() == [4.0, 0.5]
    assert float(out.loss) == pytest.approx((0.0 + 1.0) / 2, abs=1e-7)


def test_the_adaptive_loss_equals_the_hand_computation():
    # x0_hat = -v_branch and x0 = -v: the x0 errors are the velocity errors negated.  Each branch's mean squared error
    # over its mean absolute error: sample 1 pos 0 / 1e-5 = 0, neg 4 / 2 = 2; sample 2 pos 2.5 / 1.5, neg 0.5 / 0.5
    out = nft.nft_loss(V_THETA, V_OLD, TARGET, R, beta=0.5, weighting="adaptive", to_x0=lambda v: -v, x0=-TARGET)
    assert out.pos.tolist() == pytest.approx([0.0, 2.5 / 1.5]) and out.neg.tolist() == pytest.approx([2.0, 1.0])
    assert float(out.loss) == pytest.approx((0.0 + (0.25 * 2.5 / 1.5 + 0.75 * 1.0)) / 2, abs=1e-7)


@pytest.mark.parametrize("r", [1.0, 0.8, 0.5, 0.2, 0.0])
@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_the_loss_is_minimised_at_the_reward_tilted_velocity(r, beta):
    """Per sample the loss is a convex quadratic in v_theta with gradient 2b[(2r - 1)(v_old - v) + b(v_theta - v_old)]
    / D: zero at v_theta* = v_old + (2r - 1)(v - v_old) / b.  r = 1: v_plus* = v exactly (the positive branch on the
    target); r = 1/2: v_theta* = v_old (no preference); the first step from v_old moves toward v when r > 1/2 and away
    when r < 1/2."""
    g = torch.Generator().manual_seed(0)
    v_old, v = torch.randn(1, 6, generator=g, dtype=torch.float64), torch.randn(1, 6, generator=g, dtype=torch.float64)
    rr = torch.tensor([r], dtype=torch.float64)
    star = (v_old + (2 * r - 1) * (v - v_old) / beta).requires_grad_(True)
    nft.nft_loss(star, v_old, v, rr, beta).loss.backward()
    assert float(star.grad.abs().max()) < 1e-12
    if r == 1.0:
        assert torch.allclose((1 - beta) * v_old + beta * star.detach(), v, atol=1e-12)
    at_old = v_old.clone().requires_grad_(True)
    nft.nft_loss(at_old, v_old, v, rr, beta).loss.backward()
    descent = -at_old.grad
    assert torch.allclose(descent, 2 * beta * (2 * r - 1) * (v - v_old) / 6, atol=1e-12)
    for delta in (1e-3, -1e-3):  # a minimum, not a saddle
        moved = star.detach() + delta * torch.ones_like(star)
        assert float(nft.nft_loss(moved, v_old, v, rr, beta).loss) > float(nft.nft_loss(star.detach(), v_old, v, rr,
                                                                                        beta).loss)


# ---- rewards -> r --------------------------------------------------------------------------------------------------

def test_the_optimality_probability_equals_the_hand_numbers():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 5.0, 5.0])  # a group of 4, and a zero-spread group
    # group std: group 1 has mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5); adv_clip 1 clips 3 / 1.87
    out = nft.optimality(rewards, 4, std="group", std_eps=1e-4, adv_clip=1.0)
    a = [-2 / (math.sqrt(3.5) + 1e-4), -1 / (math.sqrt(3.5) + 1e-4), 0.0, 3 / (math.sqrt(3.5) + 1e-4)]
    assert out.advantages.tolist()[:4] == pytest.approx(a, abs=1e-12)
    assert out.r.tolist() == pytest.approx([0.0, 0.5 + 0.5 * a[1], 0.5, 1.0, 0.5, 0.5, 0.5, 0.5], abs=1e-12)
    assert out.zero_spread.tolist() == [False, True] and out.zero_spread_fraction == 0.5
    assert out.group_std.tolist() == pytest.approx([math.sqrt(3.5), 0.0])
    # global std: the round's 8 rewards have mean 4, population std sqrt(22 / 8); each group keeps its own mean
    out = nft.optimality(rewards, 4, std="global", std_eps=1e-4, adv_clip=5.0)
    z = math.sqrt(22 / 8) + 1e-4
    assert out.r.tolist() == pytest.approx([0.5 + 0.1 * x / z for x in (-2, -1, 0, 3)] + [0.5] * 4, abs=1e-12)
    assert out.advantages[4:].tolist() == [0.0] * 4  # exactly: a zero-spread group has no preference


# ---- one round -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pipe_dir", ["small_pixel_pipeline_dir", "flow_pipeline_dir"])
def test_a_round_trains_against_the_old_policy_then_soft_updates_it(request, pipe_dir):
    ctx = _context(request.getfixturevalue(pipe_dir), ["nft.old_decay_rate=0.25"])
    method = nft.Method(ctx)
    before = [p.detach().clone() for p in ctx.trainable]
    m = method.step()
    assert m["old_dev"] == 0.0  # the first update of the run: theta = theta_old, the same UNet batch, bit for bit
    assert m["old_decay"] == 0.25 and method.updates == 1
    after = [p.detach() for p in ctx.trainable]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    for o, a, b in zip(method.old, after, before):  # theta_old <- 0.25 theta_old + 0.75 theta
        assert torch.allclose(o, 0.25 * b + 0.75 * a, atol=1e-7)
    assert 0.0 < m["r_std"] and m["r_mean"] == pytest.approx(0.5, abs=1e-6)  # A sums to 0 within each group
    for key in ("loss", "loss_pos", "loss_neg", "grad_norm", "reward_mean", "group_reward_std"):
        assert math.isfinite(m[key]), key
    m2 = method.step()  # now theta != theta_old: the old policy's velocity differs
    assert m2["old_dev"] > 0.0 and m2["old_decay"] == 0.5 and method.updates == 2


class ConstantReward:
    name, differentiable = "constant", False

    def __call__(self, images, prompts):
        return torch.full((images.shape[0],), 0.25, device=images.device)


def test_a_round_of_equal_rewards_is_neutral(small_pixel_pipeline_dir):
    """Every group zero-spread: r = 1/2 for all, and with theta = theta_old the two branches cancel: no gradient."""
    m = nft.Method(_context(small_pixel_pipeline_dir, ["nft.weighting=uniform"], reward=ConstantReward())).step()
    assert m["zero_spread_frac"] == 1.0 and m["r_mean"] == 0.5 and m["r_std"] == 0.0
    assert m["grad_norm"] < 1e-9 and m["loss_pos"] == pytest.approx(m["loss_neg"], rel=1e-6)


# ---- config --------------------------------------------------------------------------------------------------------

def test_the_variant_records_every_setting():
    assert resolve("diffusion-nft")["variant"] == (
        "diffusion-nft/G=8x2-prompts/r=half+half*clip(A/5)(A:group-mean,global-std+0.0001)/beta=1/loss-adaptive/"
        "old=soft(eta=min(0.001k,0.5))/K=1/cfg-free/sampler=ode(steps=10)/no-kl")
    v = resolve("diffusion-nft", ["nft.old_decay_rate=0", "sampler.guidance=3", "nft.std=group", "nft.kl_coeff=1e-4",
                                  "nft.weighting=uniform", "nft.beta=0.1"])["variant"]
    assert "/old=round-start/" in v and "/guided(w=3)/" in v and "group-std" in v and v.endswith("/kl(coeff=0.0001)")
    assert "/beta=0.1/loss-uniform/" in v


# ---- through the harness -------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("world", ["tiny-flow", "small-ddpm"])
def test_two_steps_through_the_harness(request, world, tmp_path):
    pipe_dir = (os.path.join(ROOT, "models", "tiny-flow") if world == "tiny-flow"
                else request.getfixturevalue("small_pixel_pipeline_dir"))
    out = str(tmp_path / "run")
    args = small_run_args(pipe_dir, tmp_path) + ["steps=2", "eval.every=2", "eval.grid_every=2", "checkpoint_every=2",
                                                 "threads=1", *SMALL]
    assert cli.main(["run", "--method", "diffusion-nft", "--out", out, "--set", *args]) == 0
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert manifest["status"] == "complete" and manifest["variant"] == resolve("diffusion-nft", args)["variant"]
    assert summary["model_process"] == ("flow" if world == "tiny-flow" else "ddpm")
    df = metrics_of(out)
    assert df["step"].tolist() == [0, 1, 2] and df["images"].tolist() == [0, 8, 16]
    rows = df.iloc[1:]
    assert rows["old_dev"].iloc[0] == 0.0 and rows["old_decay"].tolist() == [0.001, 0.002]
    for col in ("reward_mean", "loss", "loss_pos", "loss_neg", "r_mean", "r_std", "zero_spread_frac", "grad_norm"):
        assert rows[col].notna().all(), col


@pytest.mark.slow
def test_a_killed_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    """The old weights and the soft update's clock are in the checkpoint: a killed and resumed run is the same run."""
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + ["reward=saturation", *SMALL]
    metrics, _ = assert_resumes_to_the_same_run("diffusion-nft", args, tmp_path)
    assert metrics["old_decay"].iloc[1:].tolist() == pytest.approx([0.001, 0.002, 0.003, 0.004])
