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

from bench.sampling import K_DISTS, TRUNCATIONS, sample_with_grad, truncation_mask

NAME_KEY = "alignprop"
NEEDS_DIFFERENTIABLE_REWARD = True
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


def variant(cfg) -> str:
    a = cfg[NAME_KEY]
    if a["truncation"] == "last_k":
        k = a["k"] if a["k_dist"] == "fixed" else a["k_dist"]
        return f"alignprop/last_k(K={k})"
    return f"alignprop/{a['truncation']}"


def validate(cfg) -> None:
    from bench.config import check_choice
    from bench.errors import BenchError

    a = cfg[NAME_KEY]
    check_choice("alignprop.truncation", a["truncation"], TRUNCATIONS)
    check_choice("alignprop.k_dist", a["k_dist"], K_DISTS)
    if not 1 <= a["k"] <= cfg["sampler"]["num_steps"]:
        raise BenchError(f"alignprop.k = {a['k']}; accepted: 1..sampler.num_steps ({cfg['sampler']['num_steps']})")
    if a["batch_size"] < 1 or a["grad_accum"] < 1:
        raise BenchError("alignprop.batch_size and alignprop.grad_accum must be >= 1")


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
        ctx, c, s = self.ctx, self.cfg, self.ctx.cfg.sampler
        rewards, grad_steps = [], []
        for _ in range(c.grad_accum):
            prompts = ctx.draw_prompts(c.batch_size)
            x_T = ctx.noise(c.batch_size)
            mask = truncation_mask(c.truncation, s.num_steps, ctx.generator, c.k, c.k_dist, c.k_mean, c.k_std)
            images = sample_with_grad(ctx.pipe, prompts, x_T, s.num_steps, s.guidance, s.eta, grad_mask=mask,
                                      checkpointing=c.checkpointing, generator=ctx.generator, costs=ctx.costs)
            r = ctx.score(images, prompts)
            loss = self.loss(r) / c.grad_accum
            if loss.requires_grad:  # per_step can, rarely, keep no step at all: then no gradient
                ctx.backward(loss)
            rewards.append(r.detach().float().cpu())
            grad_steps.append(sum(mask))
        grad_norm = ctx.clip_grad(c.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        r = torch.cat(rewards)
        return {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "grad_norm": grad_norm,
                "grad_steps": sum(grad_steps) / len(grad_steps)}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
