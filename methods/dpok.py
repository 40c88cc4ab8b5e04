"""DPOK: reinforcement learning for fine-tuning text-to-image diffusion models, KL-regularised.

Fan, Watkins, Du, Liu, Ryu, Boutilier, Abbeel, Ghavamzadeh, Lee, Lee, arXiv 2305.16381
(official code: google-research ``dpok/train_online_pg.py``).

Objective: min_theta  E[-alpha r(x0, c)] + beta sum_t E[KL(p_theta(x_{t-1}|x_t,c) || p_pre(x_{t-1}|x_t,c))].
Both steps are Gaussians with the same sigma_t, so each KL is ||mu_theta - mu_pre||^2 / (2 sigma_t^2);
mu_pre is the same UNet with its LoRA adapter switched off (no second copy of the model).

    repeat                                                       (one harness step = one sampling round)
        sample g_batch trajectories (eta = 1, CFG in the policy), store every transition (or all but
        the first skip_first_steps / last skip_last_steps of each trajectory)
        (x_t, x_{t-1}, t, log p_old, c) with its final reward in a replay buffer (bounded)
        [value baseline: fit V(x_t, c, t) to the final reward by MSE, v_steps minibatches]
        for p_step policy updates:
            draw p_batch x grad_accum transitions from the buffer
            A   = r - V(x_t, c, t)   (value)  |  (r - mean) / std over the buffer (batch)  |  r (none)
            rho = exp(log p_theta(x_{t-1}|x_t,c) - log p_old)
            L   = -reward_weight * A * clamp(rho, 1 - eps, 1 + eps)       (a plain clamp, not PPO's min/max)
                  + kl_weight * ||mu_theta - mu_pre||^2 / (2 sigma_t^2)
            clip the gradient norm, AdamW step

The log-prob and the KL are reduced over latent elements the same way (``logprob_reduction``:
``mean`` as the reference code's log-prob, or ``sum``); both are recorded in the run config.
``skip_first_steps`` / ``skip_last_steps`` (default 0: every step) are DDPO's option of the same name
(methods/ddpo.py): those transitions are left out of the buffer, so both terms act on the trained steps
only; recorded in the variant.  What was tried and measured: ``docs/methods/policy_gradient.md``.
"""
from __future__ import annotations

import torch
from torch import nn

from diffalign import process
from diffalign.contract import BATCH, LR, MAX_COUNT, NONNEG, POSITIVE, Choice, Int, rules
from diffalign.policy_gradient import (
    Surrogate,
    SurrogateStats,
    batch_normalise,
    check_stochastic_sampler,
    check_trained_steps,
    trained_steps,
    trained_steps_tag,
)
from diffalign.process import gaussian_kl
from diffalign.sampling import base_model, guided_eps, sample

CONFIG_SECTION = "dpok"
NEEDS_DIFFERENTIABLE_REWARD = False
BASELINES = ("batch", "value", "none")
DEFAULTS = {
    "g_batch": 8,                # trajectories sampled per round
    "p_step": 4,                 # policy updates per round
    "p_batch": 4,                # transitions per minibatch
    "grad_accum": 2,
    "buffer_size": 1000,         # transitions kept
    "lr": 3e-4,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-4,
    "ratio_clip": 1e-4,
    "reward_weight": 10.0,       # alpha (README single-prompt recipe: 10)
    "kl_weight": 0.01,           # beta  (README single-prompt recipe: 0.01)
    "kl_warmup": 0,              # harness steps before the KL term is switched on
    "grad_clip": 0.1,            # clip_norm of the official code
    "baseline": "batch",         # batch | value | none   (the paper: value; the code's v_flag=0: none)
    "v_lr": 1e-4,
    "v_steps": 5,
    "v_batch": 32,
    "logprob_reduction": "mean",
    "skip_first_steps": 0,       # transitions left out of the buffer at the start (pure-noise end) ...
    "skip_last_steps": 0,        # ... and at the end (x0 end); 0, 0 = every step, as the paper
}
RULES = rules(DEFAULTS, {
    "g_batch": BATCH, "p_step": Int(1, 10_000), "p_batch": BATCH, "buffer_size": Int(1, 10 * MAX_COUNT),
    "ratio_clip": POSITIVE, "reward_weight": NONNEG, "kl_weight": NONNEG, "kl_warmup": Int(0, MAX_COUNT),
    "baseline": Choice(BASELINES), "v_lr": LR, "v_steps": Int(1, 10_000), "v_batch": BATCH})
SMOKE = {"dpok": ["dpok.g_batch=8", "dpok.p_step=2"]}
companion_baseline = None


def variant(cfg) -> str:
    d = cfg[CONFIG_SECTION]
    return (f"dpok/clamp-ratio/kl-{d['logprob_reduction']}/baseline-{d['baseline']}"
            + trained_steps_tag(cfg, CONFIG_SECTION))


def validate(cfg) -> None:
    check_trained_steps(cfg, CONFIG_SECTION)
    check_stochastic_sampler(cfg)


def data_parallel(cfg, world: int) -> str | None:
    """Each process samples its rows of the round (the buffer holds the gathered round on every process) and trains
    on its rows of every drawn batch of transitions: any config."""
    return None


class ValueNet(nn.Module):
    """V(x_t, c, t): a small CNN on the latent, the mean text embedding and the timestep."""

    def __init__(self, channels: int, text_dim: int, width: int = 32):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2),
                                  nn.Conv2d(width, width, 3, padding=1), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())
        self.head = nn.Sequential(nn.Linear(width + text_dim + 1, 64), nn.SiLU(), nn.Linear(64, 1))

    def forward(self, x, text, t):
        feats = [self.conv(x.float()), text.float().mean(1), (t.float() / 1000.0).view(-1, 1)]
        return self.head(torch.cat(feats, 1)).squeeze(1)


class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        c = self.cfg
        self.opt = ctx.adamw()
        self.buffer: dict[str, torch.Tensor] = {}
        self.timesteps: torch.Tensor | None = None  # the sampler's timesteps (set by the first round)
        self.rounds = 0
        self.value = None
        if c.baseline == "value":
            ch = ctx.pipe.latent_shape[0]
            text_dim = ctx.pipe.text_dim
            self.value = ValueNet(ch, text_dim).to(ctx.pipe.device)
            self.v_opt = ctx.guard(torch.optim.AdamW(self.value.parameters(), lr=c.v_lr))

    def add_to_buffer(self, traj, rewards: torch.Tensor) -> None:
        B, T = traj.log_probs.shape
        new = {"x_t": traj.latents[:, :-1].reshape(B * T, *traj.latents.shape[2:]).cpu(),
               "x_prev": traj.latents[:, 1:].reshape(B * T, *traj.latents.shape[2:]).cpu(),
               "t_index": torch.arange(T).repeat(B),
               "log_prob": traj.log_probs.reshape(B * T),
               "reward": rewards.repeat_interleave(T),
               "cond": traj.cond.cpu().repeat_interleave(T, 0)}
        if traj.uncond is not None:
            new["uncond"] = traj.uncond.cpu().repeat_interleave(T, 0)
        keep = torch.isin(new["t_index"], trained_steps(T, self.cfg.skip_first_steps, self.cfg.skip_last_steps))
        new = {k: v[keep] for k, v in new.items()}
        for k, v in new.items():
            self.buffer[k] = torch.cat([self.buffer[k], v])[-self.cfg.buffer_size:] if k in self.buffer else v
        self.timesteps = traj.timesteps

    def fit_value(self) -> float:
        c, n = self.cfg, len(self.buffer["reward"])
        loss = torch.tensor(0.0)
        for _ in range(c.v_steps):
            idx = torch.randint(0, n, (min(c.v_batch, n),), generator=self.ctx.generator)
            pred = self.value(*self._value_inputs(idx))
            loss = ((pred - self.buffer["reward"][idx].to(pred.device)) ** 2).mean()
            self.v_opt.zero_grad()
            self.ctx.backward(loss)
            self.v_opt.step()
        return float(loss.detach())

    def _value_inputs(self, idx):
        dev = self.ctx.pipe.device
        return (self.buffer["x_t"][idx].to(dev), self.buffer["cond"][idx].to(dev),
                self.timesteps[self.buffer["t_index"][idx]].to(dev))

    def advantages(self, idx) -> torch.Tensor:
        r = self.buffer["reward"]
        if self.cfg.baseline == "value":
            with torch.no_grad():
                return r[idx] - self.value(*self._value_inputs(idx)).cpu()
        if self.cfg.baseline == "batch":
            return batch_normalise(r)[idx]
        return r[idx]

    def step(self) -> dict:
        ctx, c, sampler = self.ctx, self.cfg, self.ctx.cfg.sampler
        # 1. sample g_batch trajectories, score them, store their transitions in the replay buffer
        prompts, x_T, noise_gen = ctx.batch(c.g_batch)
        traj = sample(ctx.pipe, prompts, x_T, sampler.num_steps, sampler.guidance,
                      sampler.eta, generator=noise_gen, costs=ctx.costs,
                      reduction=c.logprob_reduction)
        rewards = ctx.gather(ctx.score(traj.images, prompts).float()).cpu()
        self.add_to_buffer(ctx.gather_trajectory(traj), rewards)
        self.rounds += 1
        # 2. [value baseline: fit V(x_t, c, t) to the final reward]
        v_loss = self.fit_value() if self.value is not None else float("nan")
        kl_on = self.rounds > c.kl_warmup
        unet, n = ctx.pipe.unet, len(self.buffer["reward"])
        stats = SurrogateStats()
        for _ in range(c.p_step):
            for _ in range(c.grad_accum):
                # 3. draw p_batch transitions from the buffer
                idx = ctx.local(torch.randint(0, n, (c.p_batch,), generator=ctx.generator))  # this process's rows
                b = {k: v[idx].to(ctx.pipe.device) for k, v in self.buffer.items()}
                t = self.timesteps[b["t_index"].cpu()].to(b["x_t"].device)  # one per sample: diffusers moves only 0-d
                # 4. rho = exp(log p_theta(x_{t-1} | x_t, c) - log p_old); L = -alpha A clamp(rho, 1 - eps, 1 + eps)
                eps = guided_eps(unet, b["x_t"], t, b["cond"], b.get("uncond"), sampler.guidance, ctx.costs,
                                 with_grad=True)
                out = process.step(ctx.pipe.scheduler, eps, t, b["x_t"], sampler.num_steps, sampler.eta,
                                   prev=b["x_prev"], reduction=c.logprob_reduction)
                ratio = torch.exp(out.log_prob - b["log_prob"])
                adv = self.advantages(idx).to(ratio.device)
                loss = -(c.reward_weight * adv * torch.clamp(ratio, 1 - c.ratio_clip, 1 + c.ratio_clip)).mean()
                # 5. + beta ||mu_theta - mu_pre||^2 / (2 sigma_t^2), mu_pre from the UNet with its adapter off
                with torch.no_grad(), base_model(unet) as base_unet:
                    eps_pre = guided_eps(base_unet, b["x_t"], t, b["cond"], b.get("uncond"), sampler.guidance,
                                         ctx.costs)
                    mean_pre = process.step(ctx.pipe.scheduler, eps_pre, t, b["x_t"], sampler.num_steps,
                                            sampler.eta).mean
                kl = gaussian_kl(out.mean, mean_pre, out.std, c.logprob_reduction)
                if kl_on:
                    loss = loss + c.kl_weight * kl.mean()
                ctx.backward(loss / c.grad_accum)
                stats.add(Surrogate.of(loss, out.log_prob, b["log_prob"], ratio, c.ratio_clip), kl_penalty=kl)
            # 6. clip the gradient norm, AdamW step
            ctx.clip_grad(c.grad_clip)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        summary = stats.summary()
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                "ratio_mean": summary["ratio_mean"], "clipfrac": summary["clipfrac"],
                "kl_penalty": summary["kl_penalty"], "value_loss": v_loss, "buffer": n,
                "ratio_dev_first": summary["ratio_dev_first"]}

    def state_dict(self) -> dict:
        state = {"optimizer": self.opt.state_dict(), "buffer": self.buffer, "rounds": self.rounds,
                 "timesteps": self.timesteps}
        if self.value is not None:
            state.update(value=self.value.state_dict(), v_opt=self.v_opt.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.buffer, self.rounds, self.timesteps = state["buffer"], state["rounds"], state["timesteps"]
        if self.value is not None:
            self.value.load_state_dict(state["value"])
            self.v_opt.load_state_dict(state["v_opt"])
