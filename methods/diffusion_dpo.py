"""Diffusion-DPO: direct preference optimization of a diffusion model on terminal preference pairs.

Wallace, Dang, Rafailov, Zhou, Lou, Purushwalkam, Ermon, Xiong, Joty, Naik, arXiv 2311.12908 (official code
SalesforceAIResearch/DiffusionDPO, ``train.py``).  The DPO objective on the diffusion ELBO, with the ELBO's per-step
weight dropped (uniform credit over timesteps) and one timestep per pair:

    repeat
        (c, x_0^w, x_0^l) ~ preference pairs                         (diffalign/preference.py: base, online, a file)
        t ~ U{0..T-1}, eps ~ N(0, I)          one t and one eps per pair, shared by winner and loser
        x_t^w, x_t^l = q(x_t | x_0^w, eps), q(x_t | x_0^l, eps)
        m_w, m_l = ||eps - eps_theta(x_t^., t, c)||^2      r_w, r_l = the same, reference (LoRA adapter off)
        L = -log sigmoid( -(beta / 2) [ (m_w - r_w) - (m_l - r_l) ] )
        theta <- AdamW(theta, clip(grad L))

No classifier-free guidance in training (the conditional prediction, as the official code).  The official
defaults are for Stable Diffusion on Pick-a-Pic v2 (beta 5000, lr 1e-8 x batch 2048, 2000 steps); the tiny-world
preset's are in bench/presets/diffusion-dpo.yaml.
"""
from __future__ import annotations

import torch

from diffalign.contract import rules
from diffalign.preference import (
    PAIR_DEFAULTS,
    PairSource,
    dpo_loss,
    pair_errors,
    pairs_split_refusal,
    step_metrics,
)
from diffalign.process import draw_timesteps
from diffalign.store import project_path

CONFIG_SECTION = "diffusion_dpo"
NEEDS_DIFFERENTIABLE_REWARD = False   # the reward only labels pairs
TINY_PAIRS = "models/tiny-pairs"
DEFAULTS = {
    "batch_size": 16,            # pairs per optimizer step
    "grad_accum": 1,
    "beta": 5000.0,              # beta_dpo of the official code
    "lr": 1e-4,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-2,
    "grad_clip": 1.0,
    **PAIR_DEFAULTS,
}
RULES = rules(DEFAULTS)
SMOKE = {"diffusion-dpo": ["diffusion_dpo.batch_size=8"]}
companion_baseline = None


def variant(cfg) -> str:
    d = cfg[CONFIG_SECTION]
    noise = f"/label-noise-{d['label_noise']:g}" if d["label_noise"] else ""
    return f"diffusion-dpo/pairs-{_pairs_tag(d['pairs'])}" + noise


def _pairs_tag(pairs: str) -> str:
    return pairs if pairs in ("base", "online", "tiny-pairs") else "file"


def validate(cfg) -> None:
    """No key of this section depends on another (each key's range, the pair keys' included, is its rule in RULES)."""


def data_parallel(cfg, world: int) -> str | None:
    """Each process takes its rows of every batch of pairs (fixed pair sets only)."""
    return pairs_split_refusal(CONFIG_SECTION, cfg[CONFIG_SECTION])


class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        self.opt = ctx.adamw()
        self.pairs = PairSource(self.cfg, ctx.pipe, ctx.reward, ctx.cfg.reward, ctx.train_prompts, ctx.cfg.sampler,
                                ctx.costs, ctx.cfg.seed, project_path(TINY_PAIRS))

    def step(self) -> dict:
        ctx, c, pipe = self.ctx, self.cfg, self.ctx.pipe
        losses, inside = [], []
        for _ in range(c.grad_accum):
            # 1. a batch of pairs
            prompts, x0_w, x0_l = self.pairs.draw(c.batch_size, ctx.generator)
            if not prompts:  # online: every pair a tie
                continue
            n = len(prompts)
            # 2. one t and one eps per pair, shared by winner and loser
            t = draw_timesteps(pipe.scheduler, n, ctx.generator)
            noise = torch.randn(x0_w.shape, generator=ctx.generator, dtype=torch.float32).to(x0_w)
            # (several processes: each takes its rows of the batch; the loss is their mean, gradients averaged)
            prompts, x0_w, x0_l, t, noise = (ctx.local(v) for v in (prompts, x0_w, x0_l, t, noise))
            cond = pipe.encode_prompts(prompts)
            # 3. the policy's and the reference's denoising errors
            m_w, m_l, r_w, r_l = pair_errors(pipe, x0_w, x0_l, t, noise, cond, ctx.costs)
            # 4. the DPO loss
            out = dpo_loss(m_w, m_l, r_w, r_l, c.beta)
            ctx.backward(out.loss / c.grad_accum)
            losses.append(float(out.loss.detach()))
            inside.append(ctx.gather(out.inside).cpu())
        # 5. clip, AdamW
        grad_norm = ctx.clip_grad(c.grad_clip) if losses else 0.0
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return step_metrics(losses, inside, grad_norm)

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
