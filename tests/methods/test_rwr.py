"""RWR (methods/rwr.py): its weights against a hand computation, the loss as the weighted sum of per-sample denoising
losses, one step's cost and update on the small pipeline, a run killed and resumed."""
import pytest
import torch
from conftest import assert_resumes_to_the_same_run, method_context, small_run_args

from bench.core.config import resolve
from diffalign.errors import BenchError
from diffalign.lora import add_lora, lora_state_dict
from diffalign.pipeline import load_pipeline
from methods import rwr
from rewards import get_reward


def test_exponential_weights_equal_the_hand_computation():
    # r = 1, 2, 3, 4 and tau = 0.5: w_i = e^(2 r_i) / (e^2 + e^4 + e^6 + e^8), worked by hand:
    # e^2 = 7.389056, e^4 = 54.598150, e^6 = 403.428793, e^8 = 2980.957987, sum = 3446.373986
    w = rwr.reward_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), "exponential", 0.5, 0.25)
    assert w.tolist() == pytest.approx([0.002144, 0.015842, 0.117059, 0.864955], abs=1e-6)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert rwr.effective_sample_size(w) == pytest.approx(1.312155, abs=1e-6)  # 1 / sum w^2
    # shifting every reward leaves the weights unchanged; a large tau tends to equal weights (ESS -> B)
    assert rwr.reward_weights(torch.tensor([101.0, 102.0, 103.0, 104.0]), "exponential", 0.5, 0.25).tolist() == \
        pytest.approx(w.tolist(), abs=1e-9)
    flat = rwr.reward_weights(torch.tensor([1.0, 2.0, 3.0, 4.0]), "exponential", 1e6, 0.25)
    assert rwr.effective_sample_size(flat) == pytest.approx(4.0, abs=1e-4)


def test_per_prompt_weights_are_taken_within_each_group():
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0, 10.0, 10.0, 13.0])  # two prompts' groups of four
    w = rwr.reward_weights(r, "exponential", 0.5, 0.25, groups=2)
    first = rwr.reward_weights(r[:4], "exponential", 0.5, 0.25)
    assert w[:4].tolist() == pytest.approx((first / 2).tolist(), abs=1e-12)  # each group weighs 1/2
    assert float(w[4:].sum()) == pytest.approx(0.5) and w[7] > w[4] == w[5] == w[6]
    best = rwr.reward_weights(r, "sparse", 1.0, 0.25, groups=2)
    assert best.tolist() == [0, 0, 0, 0.5, 0, 0, 0, 0.5]  # the best of each group, not the best two overall


def test_sparse_weights_keep_the_top_fraction_equally():
    w = rwr.reward_weights(torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]), "sparse", 1.0, 0.25)
    assert w.tolist() == [0, 0, 0, 0, 0, 0.5, 0, 0.5]  # the best two of eight (9 and 6)
    assert rwr.effective_sample_size(w) == pytest.approx(2.0)
    with pytest.raises(BenchError, match="keeps none"):
        resolve("rwr", ["rwr.weighting=sparse", "rwr.top_fraction=0.01", "rwr.samples_per_step=8"])


def _context(pipe_dir, overrides):
    cfg = resolve("rwr", ["model=x", "reward=saturation", "sampler.num_steps=2", "rwr.prompts_per_step=0",
                          "rwr.weighting=exponential", "rwr.temperature=0.5"] + overrides)
    pipe = load_pipeline(pipe_dir)
    return method_context(cfg, pipe, add_lora(pipe.unet, 4, 4.0, seed=0), get_reward("saturation")), pipe


def test_one_step_trains_on_the_weighted_denoising_loss_and_counts_its_cost(small_pixel_pipeline_dir):
    ctx, pipe = _context(small_pixel_pipeline_dir, ["rwr.samples_per_step=4", "rwr.inner_updates=2"])
    before = {k: v.clone() for k, v in lora_state_dict(pipe.unet).items()}
    m = rwr.Method(ctx)
    out = m.step()
    assert ctx.costs.images == 4 and ctx.costs.reward_queries == 4
    assert ctx.costs.unet_bwd == 2 * 4 * 2  # two inner updates over four samples, the guided output: 2 branches
    assert 1.0 <= out["ess"] <= 4.0 and 0.25 <= out["weight_max"] <= 1.0
    assert out["loss"] > 0 and out["grad_norm"] > 0
    after = lora_state_dict(pipe.unet)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_the_loss_is_the_weighted_sum_of_per_sample_losses(small_pixel_pipeline_dir, monkeypatch):
    """The loss the step backpropagates is sum_i w_i l_i, with w the round's softmax(r / tau) over the rewards the
    step scored and l_i each sample's mean squared denoising error at the t and eps it drew."""
    ctx, pipe = _context(small_pixel_pipeline_dir, ["rwr.samples_per_step=4", "rwr.inner_updates=1",
                                                    "rwr.temperature=0.05"])
    seen = {}
    real = {"backward": ctx.backward, "eps": rwr.guided_eps, "target": rwr.training_target, "w": rwr.reward_weights}
    monkeypatch.setattr(ctx, "backward", lambda loss: (seen.update(loss=float(loss.detach())), real["backward"](loss)))

    def eps(*a, **k):
        seen["out"] = real["eps"](*a, **k)
        return seen["out"]

    def target(*a):
        seen["target"] = real["target"](*a)
        return seen["target"]

    def weights(rewards, *a):
        seen["rewards"], seen["w"] = rewards.clone(), real["w"](rewards, *a)
        return seen["w"]

    monkeypatch.setattr(rwr, "guided_eps", eps)
    monkeypatch.setattr(rwr, "training_target", target)
    monkeypatch.setattr(rwr, "reward_weights", weights)
    rwr.Method(ctx).step()
    r = seen["rewards"].double()
    by_hand = torch.exp((r - r.max()) / 0.05) / torch.exp((r - r.max()) / 0.05).sum()
    assert seen["w"].tolist() == pytest.approx(by_hand.tolist(), abs=1e-12)
    per_sample = (seen["out"].detach().double() - seen["target"].double()).pow(2).flatten(1).mean(1)
    assert seen["loss"] == pytest.approx(float((by_hand * per_sample).sum()), rel=1e-5)
    assert seen["loss"] != pytest.approx(float(per_sample.mean()), rel=1e-3)  # not the unweighted mean


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "rwr.samples_per_step=4", "rwr.prompts_per_step=2", "rwr.top_fraction=0.5", "rwr.lr=0.01", "reward=saturation",
        "eval.metrics=[tiny-clip]"]
    a, manifest = assert_resumes_to_the_same_run("rwr", args, tmp_path)
    assert manifest["variant"] == "rwr/sparse(top=0.5)/per-prompt(2)/K=2/loss-guided"
    assert (a["grad_norm"].iloc[1:] > 0).all() and (a["ess"].iloc[1:] == 2.0).all()  # the best of each pair
    assert (a["images"].diff().dropna() == 4).all()
