"""What a method gets from the harness: ``Context``, one value, so methods never import the harness.

It holds the frozen pipeline with its LoRA adapter, the training reward, the training prompts, the run's RNG and
cost counters, and the accelerator, and offers the few operations every method needs: draw prompts and initial
noise, score images (counting reward queries), build AdamW over the LoRA weights, backpropagate and clip.

It also guards every optimizer update against non-finite values (``nan_policy``, ``nan_patience``): a reward
(``score``), a loss (``backward``) or a gradient norm (``clip_grad``) that is NaN or infinite marks the pending
update, and the guarded optimizer (``adamw``, ``guard``) then skips it: the gradients are dropped and neither the
weights nor the optimizer's state (Adam's moments, its step count) change.  Each skip is counted
(``skipped_updates``); with ``nan_policy: stop``, or after ``nan_patience`` consecutive skips, the run stops with
one line naming the step and the term.
"""
from __future__ import annotations

import dataclasses
import math

import torch

from bench.config import Config
from diffalign.costs import Costs
from diffalign.errors import BenchError
from diffalign.sampling import initial_noise


class NonFiniteStop(BenchError):
    """The run stopped on non-finite values (nan_policy stop, or nan_patience consecutive skips)."""


class GuardedOptimizer:
    """An optimizer whose ``step`` is skipped (gradients dropped, no state change) when the context has seen a
    non-finite reward, loss or gradient norm since the last update."""

    def __init__(self, opt, ctx: "Context"):
        self.opt, self.ctx = opt, ctx

    def step(self) -> bool:
        """True if the update was made, False if it was skipped."""
        ctx = self.ctx
        if not ctx.nonfinite:
            params = [p for g in self.opt.param_groups for p in g["params"] if p.grad is not None]
            if params and not all(bool(torch.isfinite(p.grad).all()) for p in params):
                ctx.nonfinite.append("gradient")
        if ctx.nonfinite:
            term = ctx.nonfinite[0]
            ctx.nonfinite.clear()
            self.opt.zero_grad(set_to_none=True)
            ctx.skipped_updates += 1
            ctx.consecutive_skips += 1
            policy, patience = ctx.cfg.get("nan_policy", "skip"), ctx.cfg.get("nan_patience", 3)
            if policy == "stop" or ctx.consecutive_skips >= patience:
                why = "nan_policy stop" if policy == "stop" else f"{ctx.consecutive_skips} consecutive updates skipped"
                raise NonFiniteStop(f"step {ctx.step}: non-finite {term}; the run stopped ({why}; nothing of it "
                                    "reached the weights); accepted: finite rewards, losses and gradients (lower the "
                                    "learning rate, check the reward), or a larger nan_patience")
            return False
        self.opt.step()
        ctx.consecutive_skips = 0
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)

    @property
    def param_groups(self):
        return self.opt.param_groups


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
    step: int = 0                     # the harness's step (named when a run stops on non-finite values)
    nonfinite: list = dataclasses.field(default_factory=list)  # terms seen non-finite since the last update
    skipped_updates: int = 0
    consecutive_skips: int = 0

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
        if not bool(torch.isfinite(scores.detach()).all()):
            self.nonfinite.append("reward")
        for name, s in getattr(self.reward, "last_terms", {}).items():  # a weighted sum: each term on its own
            self.reward_terms.setdefault(name, []).append(s.detach().float().cpu())
        return scores

    def pop_reward_terms(self) -> dict:
        """Mean of each term of a weighted-sum reward over this step's queries (``reward/<name>``)."""
        out = {f"reward/{k}": float(torch.cat(v).mean()) for k, v in self.reward_terms.items()}
        self.reward_terms.clear()
        return out

    def adamw(self) -> GuardedOptimizer:
        """AdamW over the LoRA weights, from the method's lr, adam_betas, adam_eps and weight_decay; guarded."""
        c = self.method_cfg
        opt = torch.optim.AdamW(self.trainable, lr=c.lr, betas=tuple(c.adam_betas), eps=c.adam_eps,
                                weight_decay=c.weight_decay)
        return self.guard(opt)

    def guard(self, opt: torch.optim.Optimizer) -> GuardedOptimizer:
        """Any other optimizer of a method (a discriminator's, a value function's), prepared and guarded."""
        return GuardedOptimizer(self.accelerator.prepare(opt), self)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``; a non-finite loss is not backpropagated and marks the pending update."""
        if not bool(torch.isfinite(loss.detach()).all()):
            self.nonfinite.append("loss")
            return
        self.accelerator.backward(loss)

    def clip_grad(self, max_norm: float) -> float:
        norm = float(self.accelerator.clip_grad_norm_(self.trainable, max_norm))
        if not math.isfinite(norm):
            self.nonfinite.append("gradient norm")
        return norm
