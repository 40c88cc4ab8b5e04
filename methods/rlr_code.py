"""RLR as its released code does it (method ``rlr-code``): a first-order step, then PPO single-step updates.

Ren, Zhang, Jiang, Li, Qin, Zheng, Li, Sun, Li, Liang, Li, Peng, arXiv 2502.00639 (ICLR 2026); released code
RTkenny/RLR-Optimizer, ``rlr_trainer_v_b.py``.  This is not the paper's estimator (``methods/rlr.py``) but what
that code runs, kept as its own algorithm so both can be compared:

    repeat
        c ~ prompts, x_T ~ N(0, I); sample the chain with eta = sampler.eta (the code's sample_eta), no gradients,
        storing every latent and its mean-reduced step log-prob
        # first order: AlignProp with K = 1
        x0 = the last step again from the stored x_{T-1}, eta = 0, with gradients;  R = reward(x0)
        theta <- AdamW(theta, clip(grad -loss_coeff mean R))
        # half order, as released: chain_len single steps, one update each
        A = batch z-score of R, clipped at adv_clip
        repeat chain_len times:
            k ~ U{0..T-1}
            rho = exp(clamp(log p_theta(x_{k+1} | x_k) - log p_old, -20, 20))
            theta <- AdamW(theta, clip(grad ho_loss_coeff * PPO-clipped(-A rho)))

The last step's stored log-prob is undefined in the code (eta = 0 there) and its loss is zeroed, so drawing
k = T - 1 makes an optimizer step with a zero gradient, as the code does.  No zeroth-order term.
``chain_len=0`` is AlignProp with K = 1 (the code's README).  Biased: only the last step's own gradient is exact;
the PPO terms see a ratio that the FO step has already moved.  Variant ``rlr-code/chain_len=.../ho_coeff=...``.
"""
from __future__ import annotations

import torch

from diffalign import process
from diffalign.contract import NONNEG, Int, rules
from diffalign.policy_gradient import SurrogateStats, batch_normalise, check_stochastic_sampler, ppo_clipped_surrogate
from diffalign.sampling import guided_eps, sample

CONFIG_SECTION = "rlr_code"
NEEDS_DIFFERENTIABLE_REWARD = True   # the first-order step backpropagates the reward through the last step
MAX_LOG_RATIO = 20.0                 # the code's clamp of the log importance ratio
DEFAULTS = {
    "batch_size": 8,
    "lr": 1e-3,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-4,          # RLR_Config default
    "grad_clip": 1.0,
    "loss_coeff": 0.05,            # the code's FO loss_coeff
    "checkpointing": True,         # gradient checkpointing of the first-order UNet call
    "chain_len": 2,                # PPO single-step terms per batch, each its own optimizer step
    "ho_loss_coeff": 1e-3,         # aesthetic_RLR_vb.sh
    "clip_range": 1e-4,
    "adv_clip": 5.0,
    "logprob_reduction": "mean",
}
RULES = rules(DEFAULTS, {"chain_len": Int(0, 1000), "ho_loss_coeff": NONNEG})
SMOKE = {"rlr-code": ["rlr_code.batch_size=4"]}
companion_baseline = None


def variant(cfg) -> str:
    r = cfg[CONFIG_SECTION]
    return (f"rlr-code/chain_len={r['chain_len']}/ho_coeff={r['ho_loss_coeff']:g}/clip={r['clip_range']:g}"
            f"/logprob-{r['logprob_reduction']}")


def validate(cfg) -> None:
    if cfg[CONFIG_SECTION]["chain_len"] > 0:  # 0 = AlignProp with K = 1
        check_stochastic_sampler(cfg)


def data_parallel(cfg, world: int) -> str | None:
    """Each process samples and trains its rows of the batch; the advantages use the gathered rewards: any config."""
    return None


class Method:
    """One batch: an FO update on the last step, then ``chain_len`` PPO single-step updates."""

    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        self.opt = ctx.adamw()

    def _update(self) -> float:
        norm = self.ctx.clip_grad(self.cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return norm

    def step(self) -> dict:
        ctx, c, sampler = self.ctx, self.cfg, self.ctx.cfg.sampler
        T, pipe = sampler.num_steps, ctx.pipe
        # 1. sample the chain without gradients, storing latents and step log-probs
        prompts, x_T, noise_gen = ctx.batch(c.batch_size)
        traj = sample(pipe, prompts, x_T, T, sampler.guidance, sampler.eta, generator=noise_gen, costs=ctx.costs,
                      reduction=c.logprob_reduction)
        # 2. first order: the last step again from the stored x_{T-1}, eta = 0, with gradients (AlignProp K = 1)
        t_last, x_last = traj.timesteps[T - 1], traj.latents[:, T - 1]
        eps = guided_eps(pipe.unet, x_last, t_last, traj.cond, traj.uncond, sampler.guidance, ctx.costs,
                         with_grad=True, checkpointing=c.checkpointing)
        x0 = process.step(pipe.scheduler, eps, t_last, x_last, T, 0.0).prev
        r = ctx.score(pipe.decode(x0), prompts)
        ctx.backward(-c.loss_coeff * r.mean())
        grad_norm = self._update()
        # 3. half order, as released: chain_len single uniformly drawn steps, PPO-clipped, one update each
        rewards = ctx.gather(r.detach().float()).cpu()  # the whole batch (several processes: gathered)
        adv = ctx.local(batch_normalise(rewards).clamp(-c.adv_clip, c.adv_clip)).to(x0.device)
        stats, zeroed = SurrogateStats(), 0
        for _ in range(c.chain_len):
            k = int(torch.randint(0, T, (1,), generator=ctx.generator))
            if k == T - 1:  # the code's eta = 0 last step: undefined log-prob, loss zeroed, step still taken
                for p in ctx.trainable:
                    p.grad = torch.zeros_like(p)
                zeroed += 1
                self._update()
                continue
            t = traj.timesteps[k]
            eps = guided_eps(pipe.unet, traj.latents[:, k], t, traj.cond, traj.uncond, sampler.guidance, ctx.costs,
                             with_grad=True)
            lp = process.step(pipe.scheduler, eps, t, traj.latents[:, k], T, sampler.eta,
                           prev=traj.latents[:, k + 1], reduction=c.logprob_reduction).log_prob
            out = ppo_clipped_surrogate(lp, traj.log_probs[:, k].to(lp), adv, c.clip_range, MAX_LOG_RATIO)
            ctx.backward(c.ho_loss_coeff * out.loss)
            self._update()
            stats.add(out)
        out = {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), "grad_norm": grad_norm,
               "updates": 1 + c.chain_len, "ho_zeroed": zeroed}
        summary = stats.summary()
        if summary:
            out["ratio_mean"], out["clipfrac"] = summary["ratio_mean"], summary["clipfrac"]
            out["ratio_dev_first"] = summary["ratio_dev_first"]
        return out

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
