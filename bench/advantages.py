"""Advantage estimates shared by the policy-gradient methods."""
from __future__ import annotations

import collections

import numpy as np
import torch


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


def ppo_clipped_surrogate(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
                          clip_range: float, max_log_ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, mean over the batch: max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), and the ratios
    rho = exp(log p - log p_old).  ``max_log_ratio`` clamps the log-ratio first (RLR's released code: 20)."""
    log_ratio = log_prob - old_log_prob
    if max_log_ratio is not None:
        log_ratio = torch.clamp(log_ratio, -max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean(), ratio
