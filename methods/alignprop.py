"""AlignProp: aligning text-to-image diffusion models with reward backpropagation.

Prabhudesai, Goyal, Pathak, Fragkiadaki, arXiv 2310.03739.

The whole DDIM chain is a differentiable policy x0 = pi_theta(x_T, c); the loss is the negative
reward of its output and its gradient is the exact pathwise gradient through the sampler, taken
with respect to LoRA weights only, each UNet call gradient-checkpointed:

    repeat
        c_1..c_B ~ train prompts,  x_T ~ N(0, I)
        mask     <- truncation rule                     (which steps keep their UNet's gradient)
        x0       <- DDIM(x_T, c; theta) with gradients through the masked steps
        L        <- -loss_coeff * mean_b R(x0_b, c_b)   (or loss_coeff * mean |R - target|, v1's form)
        theta    <- AdamW(theta, clip(grad L, grad_clip))   (gradients accumulated over grad_accum)

Truncation variants (named exactly; ``variant`` in the run config records which ran):

- ``per_step``: AlignProp v1's code (``main.py`` at 858f4dc, also trl's AlignPropTrainer): every step
  keeps its UNet output's gradient independently, with probability rising along the chain;
- ``last_k``: the current AlignProp code: one contiguous suffix of K steps, K ``fixed``, ``uniform``
  or ``gaussian`` (``gaussian`` is its default; K = 1 is its low-memory setting);
- ``full``: backprop through every step (the paper shows it collapses).

Defaults are the paper's (AdamW lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay, loss
coefficient 0.01, gradient clipping), scaled to the tiny world: 10 DDIM steps, CFG 3, batch 8.
"""
from __future__ import annotations

import torch

from diffalign.contract import NONNEG, POSITIVE, Choice, Int, Maybe, Real, rules
from diffalign.errors import BenchError
from diffalign.sampling import sample_with_grad

CONFIG_SECTION = "alignprop"
NEEDS_DIFFERENTIABLE_REWARD = True
TRUNCATIONS = ("full", "per_step", "last_k")
K_DISTS = ("fixed", "uniform", "gaussian")
DEFAULTS = {
    "batch_size": 8,
    "grad_accum": 1,
    "lr": 1e-3,
    "weight_decay": 0.1,          # v1 config; the trl rewrite uses 1e-4
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "loss_coeff": 0.01,
    "grad_clip": 5.0,
    "reward_target": None,        # v1's aesthetic form: loss = |R - target| (null = maximise R)
    "truncation": "last_k",       # full | per_step | last_k
    "k_dist": "gaussian",         # last_k: fixed | uniform | gaussian
    "k": 1,                       # last_k + fixed
    "k_mean": None,               # last_k + gaussian: default 8 * T / 50 (the code's N(42, 5) on 50 steps)
    "k_std": None,                # default 5 * T / 50
    "checkpointing": True,        # gradient checkpointing of every UNet call
}
RULES = rules(DEFAULTS, {"reward_target": Maybe(Real(-float("inf"))), "truncation": Choice(TRUNCATIONS),
                         "k_dist": Choice(K_DISTS), "k": Int(1, 1000), "k_mean": Maybe(POSITIVE),
                         "k_std": Maybe(NONNEG)})
SMOKE = {"alignprop": ["alignprop.batch_size=4", "alignprop.lr=0.005"]}  # bench regress's short run
companion_baseline = None


def variant(cfg) -> str:
    a = cfg[CONFIG_SECTION]
    if a["truncation"] == "last_k":
        k = a["k"] if a["k_dist"] == "fixed" else a["k_dist"]
        return f"alignprop/last_k(K={k})"
    return f"alignprop/{a['truncation']}"


def validate(cfg) -> None:
    a = cfg[CONFIG_SECTION]
    if not 1 <= a["k"] <= cfg["sampler"]["num_steps"]:
        raise BenchError(f"alignprop.k = {a['k']}; accepted: 1..sampler.num_steps ({cfg['sampler']['num_steps']})")


def data_parallel(cfg, world: int) -> str | None:
    """Each process samples its rows of the batch; the loss is its rows' mean (gradients averaged): any config."""
    return None


# ---- the truncation rule: which steps keep their UNet's gradient -----------------------------------------


def truncation_mask(variant: str, num_steps: int, generator: torch.Generator, k: int = 1,
                    k_dist: str = "fixed", k_mean: float | None = None, k_std: float | None = None) -> list[bool]:
    """Which steps keep their UNet gradient, under the named truncation rule.

    - ``full``: every step (full backprop through time; collapsed in the AlignProp paper).
    - ``per_step``: AlignProp v1's code: at every step i (0-based, 0 = pure noise) draw
      u ~ U{0..T} afresh and keep step i iff i >= u, so step i keeps its gradient with probability
      (i+1)/(T+1), rising along the chain (about T/2 steps on average, not contiguous).
    - ``last_k``: the current AlignProp code: one contiguous suffix of K steps, K drawn once per
      sampling call: ``fixed`` (K = k), ``uniform`` (K ~ U{1..T}) or ``gaussian``
      (K = round(N(k_mean, k_std)) clipped to [1, T]; the code's t_bp ~ N(42, 5) on 50 steps is
      K ~ N(8, 5), which ``k_mean``/``k_std`` default to, scaled by T/50).
    """
    if variant == "full":
        return [True] * num_steps
    if variant == "per_step":
        u = torch.randint(0, num_steps + 1, (num_steps,), generator=generator)
        return [i >= int(u[i]) for i in range(num_steps)]
    if variant == "last_k":
        kk = draw_k(num_steps, generator, k, k_dist, k_mean, k_std)
        return [i >= num_steps - kk for i in range(num_steps)]
    raise ValueError(f"truncation {variant!r}: accepted {TRUNCATIONS}")


def draw_k(num_steps: int, generator: torch.Generator, k: int = 1, k_dist: str = "fixed",
           k_mean: float | None = None, k_std: float | None = None) -> int:
    """K of the ``last_k`` rule (see ``truncation_mask``), in 1..num_steps."""
    if k_dist == "fixed":
        kk = k
    elif k_dist == "uniform":
        kk = int(torch.randint(1, num_steps + 1, (1,), generator=generator))
    elif k_dist == "gaussian":
        mean = 8.0 * num_steps / 50 if k_mean is None else k_mean
        std = 5.0 * num_steps / 50 if k_std is None else k_std
        kk = round(mean + std * float(torch.randn((), generator=generator)))
    else:
        raise ValueError(f"k_dist {k_dist!r}: accepted {K_DISTS}")
    return max(1, min(num_steps, int(kk)))


class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        self.opt = ctx.adamw()

    def loss(self, rewards):
        c = self.cfg
        if c.reward_target is None:
            return -c.loss_coeff * rewards.mean()
        return c.loss_coeff * (rewards - c.reward_target).abs().mean()

    def step(self) -> dict:
        ctx, c, sampler = self.ctx, self.cfg, self.ctx.cfg.sampler
        rewards, grad_steps = [], []
        for _ in range(c.grad_accum):
            # 1. c_1..c_B ~ train prompts, x_T ~ N(0, I)   (this process's rows of them)
            prompts, x_T, noise_gen = ctx.batch(c.batch_size)
            # 2. mask <- truncation rule
            mask = truncation_mask(c.truncation, sampler.num_steps, ctx.generator, c.k, c.k_dist, c.k_mean, c.k_std)
            # 3. x0 <- DDIM(x_T, c; theta) with gradients through the masked steps
            images = sample_with_grad(ctx.pipe, prompts, x_T, sampler.num_steps, sampler.guidance, sampler.eta,
                                      grad_mask=mask, checkpointing=c.checkpointing,
                                      generator=noise_gen, costs=ctx.costs)
            # 4. L <- -loss_coeff * mean R (accumulated over grad_accum batches)
            r = ctx.score(images, prompts)
            loss = self.loss(r) / c.grad_accum
            if loss.requires_grad:  # per_step can, rarely, keep no step at all: then no gradient
                ctx.backward(loss)
            rewards.append(ctx.gather(r.detach().float()).cpu())
            grad_steps.append(sum(mask))
        # 5. theta <- AdamW(theta, clip(grad L, grad_clip))
        grad_norm = ctx.clip_grad(c.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        r = torch.cat(rewards)
        return {"reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
                "grad_norm": grad_norm,
                "grad_steps": sum(grad_steps) / len(grad_steps)}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
