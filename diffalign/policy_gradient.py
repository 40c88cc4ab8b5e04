"""What the policy-gradient methods (DDPO, DPOK, RLR's released code) share: advantages, surrogates, step rules.

- ``PerPromptStatTracker``, ``batch_normalise``: DDPO's per-prompt and plain batch reward normalisation;
  ``group_advantages``: GRPO's normalisation within each group of samples of one prompt, with the group spreads;
- ``Surrogate`` and its makers: PPO's clipped surrogate (DDPO-IS, rlr-code), REINFORCE (DDPO-SF), and the
  per-sample statistics every one of them reports (importance ratio, clip fraction, approximate KL to the
  sampling policy), gathered over a training phase by ``SurrogateStats``, with ``ratio_dev_first``, max |rho - 1|
  at the first inner step (before any update it must be 0 up to the recomputation's rounding: the check that a
  half-precision recomputation gives back the sampled log-probs);
- ``trained_steps`` and the config rules of a step skip (``skip_first_steps`` / ``skip_last_steps``), and the
  stochastic-sampler check (a likelihood ratio needs eta > 0).
"""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import torch

from diffalign.errors import BenchError


class PerPromptStatTracker:
    """DDPO's per-prompt reward normalisation: A = (r - mean_c) / (std_c + 1e-6) with the statistics of
    the last ``buffer_size`` rewards of that prompt, or of the whole batch while a prompt has fewer
    than ``min_count`` rewards (population std, as ddpo-pytorch)."""

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.stats: dict[str, collections.deque] = {}

    def update(self, prompts: list[str], rewards: torch.Tensor) -> torch.Tensor:
        r = rewards.detach().double().cpu().numpy()
        adv = np.empty_like(r)
        for p in dict.fromkeys(prompts):
            idx = [i for i, q in enumerate(prompts) if q == p]
            buf = self.stats.setdefault(p, collections.deque(maxlen=self.buffer_size))
            buf.extend(r[idx].tolist())
            ref = r if len(buf) < self.min_count else np.asarray(buf)
            adv[idx] = (r[idx] - ref.mean()) / (ref.std() + 1e-6)
        return torch.from_numpy(adv).float()

    def state_dict(self) -> dict:
        return {p: list(b) for p, b in self.stats.items()}

    def load_state_dict(self, state: dict) -> None:
        self.stats = {p: collections.deque(v, maxlen=self.buffer_size) for p, v in state.items()}


def batch_normalise(rewards: torch.Tensor) -> torch.Tensor:
    r = rewards.detach().float()
    return (r - r.mean()) / (r.std(unbiased=False) + 1e-6)


@dataclasses.dataclass
class GroupAdvantages:
    """A round's group-relative advantages and what its groups' spreads say (CPU tensors)."""

    advantages: torch.Tensor   # (n,) float32: A_i = (R_i - mean_g) / (std_g + eps), 0 in a zero-spread group
    group_std: torch.Tensor    # (n / G,) float64: each group's reward std (population, ddof 0)
    zero_spread: torch.Tensor  # (n / G,) bool: every reward of the group equal (no signal: its advantages are 0)

    @property
    def zero_spread_fraction(self) -> float:
        return float(self.zero_spread.double().mean())


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float) -> GroupAdvantages:
    """GRPO's advantages: the rewards are consecutive groups of ``group_size`` (one prompt's samples each);
    A_i = (R_i - mean_g) / (std_g + eps) with the group's own mean and population std (ddof 0), in float64.  A group
    whose rewards are all equal gets advantages exactly 0 (computed, (R - mean) can be a rounding error of the mean,
    which / eps is not 0) and is counted in ``zero_spread``."""
    r = rewards.detach().double().cpu().reshape(-1)
    if group_size < 1 or len(r) % group_size:
        raise ValueError(f"{len(r)} rewards do not split into groups of {group_size}")
    g = r.reshape(-1, group_size)
    mean, std = g.mean(1, keepdim=True), g.std(1, unbiased=False, keepdim=True)
    zero = g.max(1).values == g.min(1).values
    adv = torch.where(zero.unsqueeze(1), torch.zeros_like(g), (g - mean) / (std + eps))
    return GroupAdvantages(adv.reshape(-1).float(), std.squeeze(1), zero)


# ---- surrogate losses -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Surrogate:
    """A policy-gradient loss on one minibatch and what it says about the update, per sample (detached)."""

    loss: torch.Tensor       # scalar, mean over the batch: what is backpropagated
    ratio: torch.Tensor      # rho = exp(log p_theta - log p_old)
    clipfrac: torch.Tensor   # 1.0 where |rho - 1| > the clip range
    approx_kl: torch.Tensor  # 0.5 (log p_theta - log p_old)^2, the KL to the sampling policy to second order

    @classmethod
    def of(cls, loss: torch.Tensor, log_prob: torch.Tensor, old_log_prob: torch.Tensor, ratio: torch.Tensor,
           clip_range: float) -> "Surrogate":
        ratio, log_ratio = ratio.detach(), (log_prob.detach() - old_log_prob)
        return cls(loss=loss, ratio=ratio, clipfrac=((ratio - 1).abs() > clip_range).float(),
                   approx_kl=0.5 * log_ratio ** 2)


def ppo_clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                          clip_range: float, max_log_ratio: float | None = None) -> Surrogate:
    """PPO's clipped surrogate, mean over the batch: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), with
    rho = exp(log p - log p_old).  ``max_log_ratio`` clamps the log-ratio first (RLR's released code: 20)."""
    log_ratio = log_prob - old_log_prob
    if max_log_ratio is not None:
        log_ratio = torch.clamp(log_ratio, -max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return Surrogate.of(torch.maximum(unclipped, clipped).mean(), log_prob, old_log_prob, ratio, clip_range)


def reinforce_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                        clip_range: float) -> Surrogate:
    """The score-function (REINFORCE) loss -mean(A log p); its ratios are reported, not used (rho = 1 on-policy)."""
    return Surrogate.of(-(advantages * log_prob).mean(), log_prob, old_log_prob, torch.exp(log_prob - old_log_prob),
                        clip_range)


class SurrogateStats:
    """The surrogates of one training phase, summarised as metrics (means over every sample and step)."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
        self.losses: list[float] = []
        self.first_dev: float | None = None  # max |rho - 1| of the first surrogate (before any update: must be 0)

    def add(self, s: Surrogate, **extra: torch.Tensor) -> None:
        if self.first_dev is None:
            self.first_dev = float((s.ratio.detach().double() - 1).abs().max())
        for name, v in (("ratio", s.ratio), ("clipfrac", s.clipfrac), ("approx_kl", s.approx_kl), *extra.items()):
            self.parts[name].append(v.detach())  # kept where it is: no host sync per UNet call on a GPU
        self.losses.append(s.loss.detach().reshape(()))

    def summary(self) -> dict:
        if not self.losses:
            return {}
        out = {("ratio_mean" if k == "ratio" else k): float(torch.cat([x.cpu() for x in v]).mean())
               for k, v in self.parts.items()}
        losses = torch.stack(self.losses).float().cpu().tolist()
        return {**out, "loss": sum(losses) / len(losses), "ratio_dev_first": self.first_dev}


# ---- which steps are trained ----------------------------------------------------------------------------

def trained_steps(num_steps: int, skip_first: int = 0, skip_last: int = 0) -> torch.Tensor:
    """Indices (sampling order, 0 = the step from pure noise) of the steps a policy gradient trains on:
    all of them unless the first / last few are skipped (their likelihood-ratio terms are the noisiest,
    ``docs/methods/policy_gradient.md``)."""
    return torch.arange(skip_first, num_steps - skip_last)


def shuffled_steps(n: int, steps: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """DDPO's inner-epoch order: a random permutation of the n samples, and for each sample its own random order of
    the trained steps ``steps`` (n, len(steps)); a caller keeps the first n_t columns (timestep_fraction).  Drawn from
    ``generator`` in this order (the permutation, then one per sample), so a run's curve is the same for a seed."""
    perm = torch.randperm(n, generator=generator)
    order = torch.stack([steps[torch.randperm(len(steps), generator=generator)] for _ in range(n)])
    return perm, order


def check_stochastic_sampler(cfg: dict) -> None:
    if cfg["sampler"]["eta"] <= 0:
        raise BenchError(f"sampler.eta = {cfg['sampler']['eta']}: policy gradients need a stochastic sampler; "
                         "accepted: eta > 0")


def check_trained_steps(cfg: dict, section: str) -> None:
    """``<section>.skip_first_steps`` / ``skip_last_steps`` must leave at least one step to train."""
    d, T = cfg[section], cfg["sampler"]["num_steps"]
    a, b = d["skip_first_steps"], d["skip_last_steps"]
    if a < 0 or b < 0 or a + b >= T:
        raise BenchError(f"{section}.skip_first_steps ({a}) and {section}.skip_last_steps ({b}) must be >= 0 and "
                         f"leave at least one of the sampler's {T} steps to train")


def trained_steps_tag(cfg: dict, section: str) -> str:
    """The variant suffix of a step skip, ``/steps-a:b-of-T`` (the trained steps a..b-1 of T); '' for none."""
    d, T = cfg[section], cfg["sampler"]["num_steps"]
    a, b = d["skip_first_steps"], d["skip_last_steps"]
    return f"/steps-{a}:{T - b}-of-{T}" if a or b else ""
