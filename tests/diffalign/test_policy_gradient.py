"""The policy-gradient helpers (diffalign/policy_gradient.py): surrogates, their statistics, advantages, step rules."""
import math

import pytest
import torch

from diffalign.errors import BenchError
from diffalign.policy_gradient import (
    PerPromptStatTracker,
    SurrogateStats,
    check_trained_steps,
    group_advantages,
    ppo_clipped_surrogate,
    reinforce_surrogate,
    trained_steps,
    trained_steps_tag,
)


def test_ppo_clip_stops_the_gradient_outside_the_band():
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0], requires_grad=True)
    old = torch.tensor([0.0, -0.5, 0.5, 0.0])  # ratios 1, e^0.5, e^-0.5, 1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    out = ppo_clipped_surrogate(lp, old, adv, clip_range=0.2)
    out.loss.backward()
    # clipped where the ratio has moved past the band in the advantage's direction
    assert lp.grad.tolist() == pytest.approx([-0.25, 0.0, 0.0, 0.25])


def test_surrogates_report_ratio_clip_fraction_and_approximate_kl():
    lp = torch.tensor([0.0, 0.1, -0.3])
    old = torch.tensor([0.0, 0.0, 0.0])
    adv = torch.tensor([1.0, -1.0, 2.0])
    ppo = ppo_clipped_surrogate(lp, old, adv, clip_range=0.05)
    assert torch.allclose(ppo.ratio, lp.exp()) and ppo.clipfrac.tolist() == [0.0, 1.0, 1.0]
    assert torch.allclose(ppo.approx_kl, 0.5 * lp ** 2)
    # the log-ratio clamp of RLR's released code bounds the ratio, not the reported KL
    clamped = ppo_clipped_surrogate(torch.tensor([30.0]), torch.tensor([0.0]), torch.tensor([1.0]), 0.1,
                                    max_log_ratio=20.0)
    assert float(clamped.ratio) == pytest.approx(math.exp(20.0)) and float(clamped.approx_kl) == 450.0
    sf = reinforce_surrogate(lp, old, adv, clip_range=0.05)
    assert float(sf.loss) == pytest.approx(float(-(adv * lp).mean()))
    stats = SurrogateStats()
    stats.add(ppo)
    stats.add(sf, kl_penalty=torch.tensor([1.0, 3.0, 5.0]))
    out = stats.summary()
    assert out["ratio_mean"] == pytest.approx(float(lp.exp().mean()))
    assert out["clipfrac"] == pytest.approx(2 / 3) and out["kl_penalty"] == 3.0
    assert out["loss"] == pytest.approx((float(ppo.loss) + float(sf.loss)) / 2)
    assert SurrogateStats().summary() == {}


def test_per_prompt_stat_tracker():
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


def test_trained_steps_and_their_variant_tag():
    cfg = {"sampler": {"num_steps": 10}, "ddpo": {"skip_first_steps": 1, "skip_last_steps": 1}}
    assert trained_steps(10, 1, 1).tolist() == list(range(1, 9))
    assert trained_steps_tag(cfg, "ddpo") == "/steps-1:9-of-10"
    assert trained_steps_tag({**cfg, "ddpo": {"skip_first_steps": 0, "skip_last_steps": 0}}, "ddpo") == ""
    check_trained_steps(cfg, "ddpo")
    with pytest.raises(BenchError, match="leave at least one of the sampler's 10 steps"):
        check_trained_steps({**cfg, "ddpo": {"skip_first_steps": 5, "skip_last_steps": 5}}, "ddpo")


def test_group_advantages_equal_the_hand_computation_and_count_zero_spread_groups():
    # three groups of three: [1, 2, 6] (mean 3, population std sqrt((4 + 1 + 9) / 3) = 2.160247), [5, 5, 5] (zero
    # spread), [0.1, 0.1, 0.1] (zero spread whose float64 mean is 0.10000000000000002, not 0.1: computed,
    # (R - mean) / eps would be -1.4e-13, not 0)
    r = torch.tensor([1.0, 2.0, 6.0, 5.0, 5.0, 5.0, 0.1, 0.1, 0.1], dtype=torch.float64)
    assert float(r[6:].mean()) != 0.1
    out = group_advantages(r, 3, eps=1e-4)
    s = 2.160247 + 1e-4
    assert out.advantages[:3].tolist() == pytest.approx([-2 / s, -1 / s, 3 / s], abs=1e-6)
    assert out.advantages[:3].tolist() == pytest.approx([-0.925777, -0.462889, 1.388666], abs=1e-6)
    assert out.advantages[3:].tolist() == [0.0] * 6  # exactly 0 in a zero-spread group
    assert out.zero_spread.tolist() == [False, True, True] and out.zero_spread_fraction == pytest.approx(2 / 3)
    assert out.group_std.tolist() == pytest.approx([2.160247, 0.0, 0.0], abs=1e-6)
    assert out.advantages.dtype == torch.float32
    # each group is normalised on its own: shifting one group's rewards leaves every advantage unchanged
    shifted = r.clone()
    shifted[:3] += 100.0
    assert torch.allclose(group_advantages(shifted, 3, 1e-4).advantages, out.advantages, atol=1e-6)
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        group_advantages(r, 4, 1e-4)
