"""What a method gets from the harness: ``Context``, one value, so methods never import the harness.

It holds the frozen pipeline with its LoRA adapter, the training reward, the training prompts, the run's RNG and
cost counters, and the accelerator, and offers the few operations every method needs: draw prompts and initial
noise, score images (counting reward queries), build AdamW over the LoRA weights, backpropagate and clip.
"""
from __future__ import annotations

import dataclasses

import torch

from bench.config import Config
from diffalign.costs import Costs
from diffalign.sampling import initial_noise


@dataclasses.dataclass
class Context:
    """The frozen pipeline with its LoRA, the reward, prompts, RNG and counters."""

    cfg: Config
    pipe: object
    reward: object
    train_prompts: list[str]
    generator: torch.Generator
    costs: Costs
    accelerator: object
    trainable: list[torch.nn.Parameter]
    reward_terms: dict = dataclasses.field(default_factory=dict)

    @property
    def method_cfg(self) -> Config:
        """The method's own config section (``cfg.<CONFIG_SECTION>``)."""
        return getattr(self.cfg, self.cfg.method_key)

    def draw_prompts(self, n: int, distinct: int = 0) -> list[str]:
        """n training prompts drawn with replacement; with ``distinct`` = k > 0, k prompts each repeated n / k
        times in a row (groups of samples per prompt, for per-prompt advantages within the round)."""
        if not distinct:
            idx = torch.randint(0, len(self.train_prompts), (n,), generator=self.generator)
            return [self.train_prompts[i] for i in idx.tolist()]
        return [p for p in self.draw_prompts(distinct) for _ in range(n // distinct)]

    def noise(self, n: int) -> torch.Tensor:
        return initial_noise(self.pipe, n, self.generator)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The training reward of ``images``, counted as reward queries; a weighted sum's terms are kept."""
        self.costs.reward_queries += images.shape[0]
        scores = self.reward(images, prompts).to(images.device)
        for name, s in getattr(self.reward, "last_terms", {}).items():  # a weighted sum: each term on its own
            self.reward_terms.setdefault(name, []).append(s.detach().float().cpu())
        return scores

    def pop_reward_terms(self) -> dict:
        """Mean of each term of a weighted-sum reward over this step's queries (``reward/<name>``)."""
        out = {f"reward/{k}": float(torch.cat(v).mean()) for k, v in self.reward_terms.items()}
        self.reward_terms.clear()
        return out

    def adamw(self) -> torch.optim.Optimizer:
        """AdamW over the LoRA weights, from the method's lr, adam_betas, adam_eps and weight_decay."""
        c = self.method_cfg
        opt = torch.optim.AdamW(self.trainable, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps,
                                weight_decay=c.weight_decay)
        return self.accelerator.prepare(opt)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def clip_grad(self, max_norm: float) -> float:
        return float(self.accelerator.clip_grad_norm_(self.trainable, max_norm))
