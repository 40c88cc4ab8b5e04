"""DDPO: training diffusion models with reinforcement learning.

Black, Janner, Du, Kostrikov, Levine, arXiv 2305.13301.

Denoising is a T-step MDP: state (c, t, x_t), action x_{t-1}, policy p_theta(x_{t-1} | x_t, c) = the
guided DDIM step with eta = 1, reward r(x0, c) at the end only.  Objective J = E[r(x0, c)].

    repeat                                                      (one harness step = one sampling round)
        # sampling phase (no gradients)
        c ~ prompts, x_T ~ N(0, I); run DDIM (eta = 1, CFG in the policy), store x_T..x_0 and
        log p_old(x_{t-1} | x_t, c) for every step; r = reward(x0, c)
        A = per-prompt normalised r (running buffer, batch statistics until min_count), clipped
        # training phase
        for each inner epoch:
            shuffle samples; shuffle the order of every sample's trained steps independently
            (all T, or all but the skip_first / skip_last ones); keep the first ceil(timestep_fraction x
            that many) of each order
            for each minibatch, for each kept timestep position:
                log p_theta(stored x_{t-1} | stored x_t, c)      (recomputed guided prediction)
                rho = exp(log p_theta - log p_old)
                SF:  L = -A log p_theta                           (REINFORCE; rho = 1 on-policy)
                IS:  L = mean max(-A rho, -A clip(rho, 1 - eps, 1 + eps))   (PPO-clipped)
            accumulate over grad_accum minibatches x kept timesteps, clip the gradient, AdamW step

Variants, named exactly: ``ddpo`` = DDPO-IS, ``ddpo-sf`` = DDPO-SF (one inner epoch, one optimizer
update per sampling round, so it stays on-policy).  ``logprob_reduction`` records whether the step
log-prob is averaged over latent elements (``mean``: ddpo-pytorch and trl, what clip_range 1e-4
assumes) or summed (the true log-density).  ``skip_first_steps`` / ``skip_last_steps`` (default 0:
every step, as the paper) leave the first / last denoising steps out of training, recorded in the variant
as ``/steps-a:b-of-T``; biased (those steps' part of the gradient is lost), for a lower variance.  Why, and
what was measured: ``docs/methods/policy_gradient.md``.
"""
from __future__ import annotations

import math

import torch

from diffalign import process
from diffalign.contract import BATCH, MAX_BATCH, MAX_COUNT, Choice, Flag, Int, Real, rules
from diffalign.errors import BenchError
from diffalign.policy_gradient import (
    PerPromptStatTracker,
    Surrogate,
    SurrogateStats,
    batch_normalise,
    check_stochastic_sampler,
    check_trained_steps,
    ppo_clipped_surrogate,
    reinforce_surrogate,
    shuffled_steps,
    trained_steps,
    trained_steps_tag,
)
from diffalign.sampling import Trajectory, guided_eps, sample

CONFIG_SECTION = "ddpo"
NEEDS_DIFFERENTIABLE_REWARD = False
ESTIMATORS = ("is", "sf")
DEFAULTS = {
    "estimator": "is",           # is (PPO-clipped importance sampling) | sf (score function / REINFORCE)
    "samples_per_step": 16,      # trajectories per sampling round
    "prompts_per_step": 0,       # 0: every trajectory draws its own prompt (DDPO); k: k prompts x samples/k each
    "sample_batch_size": 8,
    "train_batch_size": 4,
    "grad_accum": 2,             # minibatches per optimizer update (x every kept timestep)
    "inner_epochs": 1,
    "lr": 3e-4,                  # ddpo-pytorch's LoRA learning rate
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-4,
    "clip_range": 1e-4,
    "adv_clip": 5.0,
    "grad_clip": 1.0,
    "timestep_fraction": 1.0,
    "skip_first_steps": 0,       # denoising steps left out of training at the start (pure-noise end) ...
    "skip_last_steps": 0,        # ... and at the end (x0 end); 0, 0 = every step, as the paper
    "per_prompt_stats": True,
    "stat_buffer": 16,
    "stat_min_count": 16,
    "logprob_reduction": "mean",
}
RULES = rules(DEFAULTS, {
    "estimator": Choice(ESTIMATORS), "samples_per_step": BATCH, "prompts_per_step": Int(0, MAX_BATCH),
    "sample_batch_size": BATCH, "train_batch_size": BATCH, "inner_epochs": Int(1, 1000),
    "timestep_fraction": Real(0.0, 1.0, lo_open=True), "per_prompt_stats": Flag(), "stat_buffer": Int(1, MAX_COUNT),
    "stat_min_count": Int(1, MAX_COUNT)})
_SMOKE = ["ddpo.samples_per_step=8", "ddpo.stat_min_count=8", "ddpo.stat_buffer=8"]
SMOKE = {"ddpo": _SMOKE + ["ddpo.grad_accum=1"],  # two updates per round: the second is off-policy, PPO's clip acts
         "ddpo-sf": _SMOKE + ["ddpo.grad_accum=2"]}  # one on-policy update per round, as DDPO-SF must
companion_baseline = None


def variant(cfg) -> str:
    d = cfg[CONFIG_SECTION]
    return (f"ddpo-{d['estimator']}/logprob-{d['logprob_reduction']}"
            + ("/per-prompt-adv" if d["per_prompt_stats"] else "/batch-adv")
            + (f"/{d['prompts_per_step']}-prompts-per-round" if d["prompts_per_step"] else "")
            + trained_steps_tag(cfg, CONFIG_SECTION))


def validate(cfg) -> None:
    d = cfg[CONFIG_SECTION]
    check_trained_steps(cfg, CONFIG_SECTION)
    check_stochastic_sampler(cfg)
    if cfg["method"] == "ddpo-sf" and d["estimator"] != "sf":
        raise BenchError("method 'ddpo-sf' needs ddpo.estimator=sf; for the importance-sampling variant use "
                         "method 'ddpo'")
    n, b, tb = d["samples_per_step"], d["sample_batch_size"], d["train_batch_size"]
    if n % b or n % (tb * d["grad_accum"]):
        raise BenchError(f"ddpo.samples_per_step ({n}) must be a multiple of sample_batch_size ({b}) and of "
                         f"train_batch_size x grad_accum ({tb} x {d['grad_accum']})")
    if d["estimator"] == "sf" and (d["inner_epochs"] != 1 or n != tb * d["grad_accum"]):
        raise BenchError("DDPO-SF makes one on-policy update per sampling round: set ddpo.inner_epochs=1 and "
                         "ddpo.train_batch_size x ddpo.grad_accum = ddpo.samples_per_step")
    if d["prompts_per_step"] and n % d["prompts_per_step"]:
        raise BenchError(f"ddpo.prompts_per_step ({d['prompts_per_step']}) must divide ddpo.samples_per_step ({n}); "
                         "accepted: 0 (a prompt per sample) or a divisor")


def data_parallel(cfg, world: int) -> str | None:
    """Each process samples its rows of every sample batch (the round gathered on every process) and trains on its
    rows of every minibatch: any config whose batches divide (the context refuses those that do not)."""
    return None


def policy_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, estimator: str,
                clip_range: float) -> Surrogate:
    """Per-step surrogate loss (mean over the batch): REINFORCE (SF) or PPO's clipped ratio (IS)."""
    if estimator == "sf":
        return reinforce_surrogate(log_prob, old_log_prob, advantages, clip_range)
    return ppo_clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)


class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        self.opt = ctx.adamw()
        self.tracker = PerPromptStatTracker(self.cfg.stat_buffer, self.cfg.stat_min_count)

    # ---- sampling phase ----------------------------------------------------------------------------
    def collect(self) -> tuple[list[str], Trajectory, torch.Tensor, torch.Tensor]:
        """One sampling round: prompts, the trajectories, their rewards and clipped advantages."""
        ctx, c, sampler = self.ctx, self.cfg, self.ctx.cfg.sampler
        # 1. c ~ prompts, x_T ~ N(0, I); DDIM (eta = 1, CFG), storing every latent and step log-prob
        prompts = ctx.draw_prompts(c.samples_per_step, c.prompts_per_step)
        parts, rewards = [], []
        for b in range(0, c.samples_per_step, c.sample_batch_size):
            batch_prompts, x_T, noise_gen = ctx.batch(c.sample_batch_size, prompts=prompts[b:b + c.sample_batch_size])
            traj = sample(ctx.pipe, batch_prompts, x_T, sampler.num_steps, sampler.guidance, sampler.eta,
                          generator=noise_gen, costs=ctx.costs, reduction=c.logprob_reduction)
            # 2. r = reward(x0, c)   (several processes: the whole batch gathered on each)
            rewards.append(ctx.gather(ctx.score(traj.images, batch_prompts).float()).cpu())
            parts.append(ctx.gather_trajectory(traj))
        rewards = torch.cat(rewards)
        # 3. A = per-prompt normalised r (or over the batch), clipped
        adv = self.tracker.update(prompts, rewards) if c.per_prompt_stats else batch_normalise(rewards)
        return prompts, Trajectory.cat(parts), rewards, adv.clamp(-c.adv_clip, c.adv_clip)

    # ---- training phase ----------------------------------------------------------------------------
    def step(self) -> dict:
        ctx, c, sampler = self.ctx, self.cfg, self.ctx.cfg.sampler
        _, traj, rewards, advantages = self.collect()
        n, T = traj.latents.shape[0], traj.log_probs.shape[1]
        steps = trained_steps(T, c.skip_first_steps, c.skip_last_steps)
        n_t = math.ceil(c.timestep_fraction * len(steps))
        g = ctx.generator
        stats = SurrogateStats()
        micro = 0
        for _ in range(c.inner_epochs):
            # 4. shuffle the samples, and every sample's trained steps independently; keep the first n_t
            perm, order = shuffled_steps(n, steps, g)
            for start in range(0, n, c.train_batch_size):
                idx = ctx.local(perm[start:start + c.train_batch_size])  # this process's rows of the minibatch
                for j in range(n_t):
                    ti = order[idx, j]
                    x_t, x_prev, t, cond, uncond = traj.transition(idx, ti)
                    # 5. log p_theta(stored x_{t-1} | stored x_t, c), the guided prediction recomputed
                    eps = guided_eps(ctx.pipe.unet, x_t, t, cond, uncond, sampler.guidance, ctx.costs,
                                     with_grad=True)
                    lp = process.step(ctx.pipe.scheduler, eps, t, x_t, sampler.num_steps, sampler.eta, prev=x_prev,
                                   reduction=c.logprob_reduction).log_prob
                    # 6. SF: -A log p_theta;  IS: PPO's clipped -A rho
                    out = policy_loss(lp, traj.log_probs[idx, ti].to(lp.device), advantages[idx].to(lp.device),
                                      c.estimator, c.clip_range)
                    ctx.backward(out.loss / (n_t * c.grad_accum))
                    stats.add(out)
                micro += 1
                # 7. accumulated over grad_accum minibatches x kept timesteps: clip, AdamW step
                if micro % c.grad_accum == 0:
                    ctx.clip_grad(c.grad_clip)
                    self.opt.step()
                    self.opt.zero_grad(set_to_none=True)
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                **stats.summary(), "updates": micro // c.grad_accum}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
