"""GRPO for diffusion and flow models: group-relative policy optimisation, and its published variants as presets.

Flow-GRPO: Liu, Liu, Liu, Yu, Li, Wang, Li, Ouyang, "Flow-GRPO: Training Flow Matching Models via Online RL",
arXiv 2505.05470.  DanceGRPO: Xue et al., arXiv 2505.07818.  MixGRPO: Li, Cui, Huang, Ma, Fan, Yang, Zhong,
arXiv 2507.21802.  One algorithm; the variants differ in which steps are stochastic and trained, in the initial noise
of a group, and in the KL term.

Denoising is the T-step MDP of DDPO: policy p_theta(x_{t-1} | x_t, c) = the guided sampler step (process.step:
DDIM with eta > 0 on a DDPM model, Flow-GRPO's SDE with noise level a = eta on a flow), reward r(x0, c) at the end.
Steps with eta = 0 (the ODE / DDIM step) are deterministic: no log-prob, not trained.

    repeat                                                      (one harness step = one round k = 0, 1, ...)
        # sampling phase (no gradients)
        1. S_k <- the round's SDE steps (every step; or a window of w consecutive steps, by the schedule)
        2. c_1..c_K ~ prompts, each repeated G times (a group); x_T ~ N(0, I) per sample (or one per group: shared)
           run the sampler with eta on the steps in S_k and eta = 0 elsewhere; store x_T..x_0, log p_old per step
        3. R_i = r(x0_i, c_i);  A_i = (R_i - mean_g) / (std_g + eps) within each group g (0 for a zero-spread
           group), clipped to [-adv_clip, adv_clip]
        # training phase
        4. for each inner epoch: shuffle the samples; per sample, a random order of its trainable steps (S_k minus
           the skipped first / last steps), the first ceil(timestep_fraction x that many) kept
           for each minibatch, for each kept step position:
               log p_theta(stored x_{t-1} | stored x_t, c)      (the guided prediction recomputed)
               rho = exp(log p_theta - log p_old)
               L = mean_i -min(A_i rho_i, A_i clip(rho_i, 1 - e, 1 + e))  +  beta mean_i KL_i
               KL_i = ||mu_theta - mu_ref||^2 / (2 std^2)   (diffalign.process.gaussian_kl; mu_ref: the base
                       model's mean at the same x_t, its LoRA switched off: sampling.base_model)
           each L / (kept steps x grad_accum) accumulated over grad_accum minibatches: clip, AdamW step

The variants (registered names, each a preset ``bench/presets/<name>.yaml``; ``validate`` holds each to what makes it
that variant, and ``variant`` records the exact settings, its first word the registered name):

- ``flow-grpo``: the SDE on every step, KL beta > 0 (their GenEval config: 0.04), and "denoising reduction": the
  training sampler (``sampler.num_steps``) has fewer steps than the evaluation (``eval.num_steps``), recorded as
  ``nfe-train<n>-eval<m>``.  The last step is sampled but not trained (Flow-GRPO's code trains the first 9 of 10
  steps: the last step's small std gives huge log-densities; its author's explanation, flow_grpo issue 62).
- ``flow-grpo-fast``: the SDE, and training, on a window of w (1 or 2) consecutive steps; the ODE elsewhere.  The
  window's start is drawn uniformly per round from the first ``window_range`` of the trajectory (Flow-GRPO's code:
  a window of 2 or 3 with its start in the first half; its author found high-noise windows work best, flow_grpo
  issue 184).  Samples of a group start from independent x_T (the current public code's form; the earlier
  "branch after a shared ODE prefix" form is ``shared_noise: true``, without its saving of compute).
- ``dance-grpo``: every sample of a group starts from the same x_T (``shared_noise``), so a group's spread comes from
  the sampler's step noise alone; a random subset of the steps trained (per sample, ``timestep_fraction``: 0.6 in
  the preset, our reading of the released scripts, not a number the paper states); no KL.  The SDE is the suite's
  (DDIM eta on DDPM, Flow-GRPO's on a flow), not DanceGRPO's own flow SDE: named ``sde=process`` in the variant.
- ``mix-grpo``: the SDE and training only inside a window of w consecutive steps that slides along the trajectory as
  training proceeds; the ODE outside.  The schedule is ours, ``progressive-clamped``: in round k the window starts at
  min(lo + stride x floor(k / every), hi - w) (lo, hi: the first trainable step and one past the last), i.e. it
  starts at the noisy end and moves one stride toward x0 every ``every`` rounds, then stays at the last position.
  MixGRPO's paper slides a window of 4 of 25 steps by one step every 25 iterations from the noisy end; its exact
  stopping / restart rule at the end and its decay variants are not reproduced, and the preset's w, stride and
  every are scaled to the tiny world's 10 steps and 24 rounds (recorded in the variant).  Outside the window the
  suite's first-order ODE / DDIM step (MixGRPO-Flash's higher-order solver is not used).

Choices named here because the papers leave them open or differ: the group std is the population std (ddof 0,
Flow-GRPO's and ddpo-pytorch's np.std) plus ``std_eps`` (1e-4, Flow-GRPO's); groups are consecutive rows of one
prompt drawn with replacement (two groups may share a prompt: they stay two groups); the log-prob and the KL are
reduced over latent elements by ``logprob_reduction`` (``mean``, Flow-GRPO's code, what clip_range 1e-4 assumes);
the KL term and its reference pass run only when beta > 0 (``kl`` is then logged).  Shared noise draws one x_T per
group from the run's generator before the round's batches (every process draws the same); each batch's per-sample
x_T is still drawn by the harness and left unused.

Logged beside the common metrics: ``ratio_first_mean`` / ``ratio_first_std`` (the importance ratios of every
(sample, step) before the first optimizer update: exactly 1 and 0 on-policy), ``ratio_dev_first`` (max |rho - 1|
of the first minibatch-step, as DDPO), ``ratio_mean``, ``clipfrac``, ``approx_kl`` (to the sampling policy), ``kl``
(to the reference, when beta > 0), ``group_reward_std`` (mean within-group std), ``zero_spread_frac`` (the fraction
of groups whose rewards are all equal: no signal), ``sde_window_start`` (window variants).

Data parallel: every process samples its rows of each sampling batch (a group may straddle processes), the rewards
and trajectories are gathered, so every process computes the same group statistics over whole groups, and each
trains its rows of every minibatch: any config whose batches divide over the processes (the context refuses the
others with one line).
"""
from __future__ import annotations

import math

import torch

from diffalign import process
from diffalign.contract import BATCH, MAX_BATCH, NONNEG, POSITIVE, Choice, Flag, Int, Real, rules
from diffalign.errors import BenchError
from diffalign.policy_gradient import (
    Surrogate,
    SurrogateStats,
    check_stochastic_sampler,
    group_advantages,
    ppo_clipped_surrogate,
    shuffled_steps,
)
from diffalign.process import gaussian_kl
from diffalign.sampling import Trajectory, base_model, guided_eps, sample

CONFIG_SECTION = "grpo"
NEEDS_DIFFERENTIABLE_REWARD = False
SCHEDULES = ("fixed", "random", "progressive")
DEFAULTS = {
    "group_size": 8,             # G: samples per prompt (a group)
    "prompts_per_step": 2,       # K: groups per round (K x G samples)
    "sample_batch_size": 8,      # samples per sampler call
    "train_batch_size": 8,       # = sample_batch_size: the training UNet calls have the sampler's batch shape, so
                                 # on-policy ratios are exactly 1 (a CPU convolution's bits can depend on the batch
                                 # size: |rho - 1| up to 2.4e-7 at 2 vs 4 on the tiny flow UNet, measured)
    "grad_accum": 1,             # minibatches per optimizer update (x every kept step)
    "inner_epochs": 1,           # passes over a round's samples
    "lr": 3e-4,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-4,
    "grad_clip": 1.0,
    "clip_range": 1e-4,          # PPO's e
    "adv_clip": 5.0,
    "std_eps": 1e-4,             # A = (R - mean_g) / (std_g + std_eps)
    "beta": 0.0,                 # KL to the reference (base) model; 0: no KL term, no reference pass
    "shared_noise": False,       # one x_T per group (DanceGRPO)
    "timestep_fraction": 1.0,    # per sample, this fraction of its trainable steps (a random subset) is trained
    "skip_first_steps": 0,       # steps never trained at the start (noisy end) ...
    "skip_last_steps": 0,        # ... and at the end; the window lives between them
    "sde_window": 0,             # 0: the SDE on every step | w: on a window of w consecutive steps, the ODE elsewhere
    "window_schedule": "fixed",  # fixed (at the first trainable step) | random (start uniform per round) | progressive
    "window_range": 1.0,         # random: the window lies within the first this-fraction of the T steps
    "window_stride": 1,          # progressive: steps the window moves ...
    "window_every": 4,           # ... every this many rounds
    "logprob_reduction": "mean",
}
RULES = rules(DEFAULTS, {
    "group_size": Int(2, 1024), "prompts_per_step": Int(1, MAX_BATCH), "sample_batch_size": BATCH,
    "train_batch_size": BATCH, "inner_epochs": Int(1, 1000), "std_eps": POSITIVE, "beta": NONNEG,
    "shared_noise": Flag(), "timestep_fraction": Real(0.0, 1.0, lo_open=True), "sde_window": Int(0, 1000),
    "window_schedule": Choice(SCHEDULES), "window_range": Real(0.0, 1.0, lo_open=True),
    "window_stride": Int(1, 1000), "window_every": Int(1, 1_000_000)})
# bench regress's short run: 2 groups of 4, two updates per round of a minibatch of 4 each (the second off-policy:
# PPO's clip acts)
_SMOKE = ["grpo.group_size=4", "grpo.prompts_per_step=2", "grpo.sample_batch_size=4", "grpo.train_batch_size=4",
          "grpo.grad_accum=1"]
SMOKE = {"flow-grpo": _SMOKE, "flow-grpo-fast": _SMOKE, "dance-grpo": _SMOKE,
         "mix-grpo": _SMOKE + ["grpo.sde_window=2", "grpo.window_every=1"]}  # the window moves in the short run
companion_baseline = None


# ---- which steps are stochastic and trained ---------------------------------------------------------------------

def window_bounds(num_steps: int, d) -> tuple[int, int]:
    """(lo, hi): the window's start lies in lo .. hi - w.  lo = the first trainable step; hi = one past the last
    (``random``: floor(window_range x T), within the trainable steps, at least lo + w)."""
    lo, hi = d["skip_first_steps"], num_steps - d["skip_last_steps"]
    if d["window_schedule"] == "random":
        hi = max(lo + d["sde_window"], min(hi, math.floor(d["window_range"] * num_steps)))
    return lo, hi


def window_start(num_steps: int, d, round_: int, generator: torch.Generator | None = None) -> int:
    """The first step of round ``round_``'s SDE window (``random`` draws it from ``generator``)."""
    lo, hi = window_bounds(num_steps, d)
    w, schedule = d["sde_window"], d["window_schedule"]
    if schedule == "fixed":
        return lo
    if schedule == "random":
        return lo + int(torch.randint(0, hi - w - lo + 1, (1,), generator=generator))
    return min(lo + d["window_stride"] * (round_ // d["window_every"]), hi - w)


def round_steps(num_steps: int, d, round_: int, generator: torch.Generator | None = None) -> tuple[list[int],
                                                                                                   list[int]]:
    """(the steps that run the SDE, the steps that may be trained) in round ``round_`` (indices in sampling order,
    0 = the step from pure noise).  Without a window: the SDE on all T steps, training on all but the skipped ones;
    with one: both are the window."""
    if not d["sde_window"]:
        return list(range(num_steps)), list(range(d["skip_first_steps"], num_steps - d["skip_last_steps"]))
    s = window_start(num_steps, d, round_, generator)
    window = list(range(s, s + d["sde_window"]))
    return window, window


def window_tag(cfg) -> str:
    d, T = cfg[CONFIG_SECTION], cfg["sampler"]["num_steps"]
    w = d["sde_window"]
    if not w:
        return "sde-every-step"
    lo, hi = window_bounds(T, d)
    where = {"fixed": f"steps-{lo}:{lo + w}",
             "random": f"start~U{{{lo}..{hi - w}}}-per-round",
             "progressive": (f"progressive-clamped(start=min({lo}+{d['window_stride']}*floor(k/{d['window_every']}),"
                             f"{hi - w}))")}[d["window_schedule"]]
    return f"sde-window(w={w},{where})-ode-elsewhere"


def variant(cfg) -> str:
    d, s = cfg[CONFIG_SECTION], cfg["sampler"]
    T = s["num_steps"]
    trained = "train-window" if d["sde_window"] else f"train-steps-{d['skip_first_steps']}:{T - d['skip_last_steps']}"
    if d["timestep_fraction"] < 1:
        trained += f"-random-subset({d['timestep_fraction']:g})"
    return "/".join([
        cfg["method"], f"G={d['group_size']}x{d['prompts_per_step']}-prompts",
        f"adv-group(std-ddof0+{d['std_eps']:g},clip={d['adv_clip']:g})",
        f"ppo(clip={d['clip_range']:g},epochs={d['inner_epochs']})",
        f"kl(beta={d['beta']:g})" if d["beta"] else "no-kl",
        "shared-noise" if d["shared_noise"] else "iid-noise",
        f"sde=process(eta={s['eta']:g})", window_tag(cfg), trained,
        f"nfe-train{T}-eval{cfg['eval']['num_steps']}", f"logprob-{d['logprob_reduction']}"])


# what makes each registered name that variant (the rest of its settings are free)
REQUIRES = {
    "flow-grpo": ("the SDE on every step: grpo.sde_window=0", lambda d: d["sde_window"] == 0),
    "flow-grpo-fast": ("an SDE window of 1 or 2 steps that does not slide with training: grpo.sde_window 1..2, "
                       "grpo.window_schedule fixed or random",
                       lambda d: 1 <= d["sde_window"] <= 2 and d["window_schedule"] != "progressive"),
    "dance-grpo": ("one initial noise per group and no KL term: grpo.shared_noise=true, grpo.beta=0",
                   lambda d: d["shared_noise"] and d["beta"] == 0),
    "mix-grpo": ("a sliding SDE window: grpo.sde_window > 0, grpo.window_schedule=progressive",
                 lambda d: d["sde_window"] > 0 and d["window_schedule"] == "progressive"),
}


def validate(cfg) -> None:
    d, T = cfg[CONFIG_SECTION], cfg["sampler"]["num_steps"]
    check_stochastic_sampler(cfg)
    need = REQUIRES.get(cfg["method"])
    if need is not None and not need[1](d):
        raise BenchError(f"method {cfg['method']!r} needs {need[0]}")
    n, b, tb = d["group_size"] * d["prompts_per_step"], d["sample_batch_size"], d["train_batch_size"]
    if n % b or n % (tb * d["grad_accum"]):
        raise BenchError(f"grpo.group_size x grpo.prompts_per_step ({n} samples) must be a multiple of "
                         f"sample_batch_size ({b}) and of train_batch_size x grad_accum ({tb} x {d['grad_accum']})")
    a, z = d["skip_first_steps"], d["skip_last_steps"]
    if a + z + max(1, d["sde_window"]) > T:
        raise BenchError(f"grpo.skip_first_steps ({a}) + grpo.skip_last_steps ({z}) + the SDE window "
                         f"({max(1, d['sde_window'])}) must fit in the sampler's {T} steps")


def data_parallel(cfg, world: int) -> str | None:
    """Each process samples its rows of every sampling batch; the rewards and trajectories are gathered, so the group
    statistics are over whole groups on every process, and each trains its rows of every minibatch: any config whose
    batches divide (the context refuses those that do not)."""
    return None


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float,
              kl: torch.Tensor | None = None, beta: float = 0.0) -> Surrogate:
    """One minibatch-step's loss: PPO's clipped surrogate mean_i -min(A rho, A clip(rho)) plus beta mean_i KL_i."""
    out = ppo_clipped_surrogate(log_prob, old_log_prob, advantages, clip_range)
    if kl is not None and beta:
        out.loss = out.loss + beta * kl.mean()
    return out


class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        self.opt = ctx.adamw()
        self.round = 0  # rounds done: the progressive window's clock (checkpointed)

    # ---- sampling phase ----------------------------------------------------------------------------
    def collect(self, etas: list[float]) -> tuple[Trajectory, torch.Tensor]:
        """2. K prompts x G samples with the round's per-step eta; their rewards (gathered, global row order)."""
        ctx, c, sampler = self.ctx, self.cfg, self.ctx.cfg.sampler
        n, G = c.group_size * c.prompts_per_step, c.group_size
        prompts = ctx.draw_prompts(n, c.prompts_per_step)  # K prompts, each G times in a row
        shared = ctx.noise(c.prompts_per_step).repeat_interleave(G, 0) if c.shared_noise else None
        parts, rewards = [], []
        for b in range(0, n, c.sample_batch_size):
            batch_prompts, x_T, noise_gen = ctx.batch(c.sample_batch_size, prompts=prompts[b:b + c.sample_batch_size])
            if shared is not None:
                x_T = ctx.local(shared[b:b + c.sample_batch_size])  # one x_T per group, this process's rows
            traj = sample(ctx.pipe, batch_prompts, x_T, sampler.num_steps, sampler.guidance, etas,
                          generator=noise_gen, costs=ctx.costs, reduction=c.logprob_reduction)
            # 3. R = r(x0, c)   (several processes: the whole batch gathered on each)
            rewards.append(ctx.gather(ctx.score(traj.images, batch_prompts).float()).cpu())
            parts.append(ctx.gather_trajectory(traj))
        return Trajectory.cat(parts), torch.cat(rewards)

    # ---- one round ---------------------------------------------------------------------------------
    def step(self) -> dict:
        ctx, c, sampler = self.ctx, self.cfg, self.ctx.cfg.sampler
        T, g = sampler.num_steps, ctx.generator
        # 1. the round's SDE steps (and trainable steps)
        sde, trainable = round_steps(T, c, self.round, g)
        etas = [sampler.eta if i in sde else 0.0 for i in range(T)]
        traj, rewards = self.collect(etas)
        # 3. group-relative advantages
        groups = group_advantages(rewards, c.group_size, c.std_eps)
        advantages = groups.advantages.clamp(-c.adv_clip, c.adv_clip)
        n, steps = traj.latents.shape[0], torch.tensor(trainable)
        n_t = math.ceil(c.timestep_fraction * len(steps))
        stats, first_ratios = SurrogateStats(), []
        micro = updates = 0
        for _ in range(c.inner_epochs):
            # 4. shuffle the samples, and every sample's trainable steps independently; keep the first n_t
            perm, order = shuffled_steps(n, steps, g)
            for start in range(0, n, c.train_batch_size):
                idx = ctx.local(perm[start:start + c.train_batch_size])  # this process's rows of the minibatch
                for j in range(n_t):
                    ti = order[idx, j]
                    x_t, x_prev, t, cond, uncond = traj.transition(idx, ti)
                    # log p_theta(stored x_{t-1} | stored x_t, c), the guided prediction recomputed
                    eps = guided_eps(ctx.pipe.unet, x_t, t, cond, uncond, sampler.guidance, ctx.costs,
                                     with_grad=True)
                    out = process.step(ctx.pipe.scheduler, eps, t, x_t, T, sampler.eta, prev=x_prev,
                                       reduction=c.logprob_reduction)
                    kl = None
                    if c.beta > 0:  # the reference: the same UNet with its LoRA off, at the same x_t
                        with torch.no_grad(), base_model(ctx.pipe.unet) as base_unet:
                            ref_eps = guided_eps(base_unet, x_t, t, cond, uncond, sampler.guidance, ctx.costs)
                            ref = process.step(ctx.pipe.scheduler, ref_eps, t, x_t, T, sampler.eta, prev=x_prev,
                                               reduction=c.logprob_reduction)
                        kl = gaussian_kl(out.mean, ref.mean, out.std, c.logprob_reduction)
                    s = grpo_loss(out.log_prob, traj.log_probs[idx, ti].to(out.log_prob.device),
                                  advantages[idx].to(out.log_prob.device), c.clip_range, kl, c.beta)
                    ctx.backward(s.loss / (n_t * c.grad_accum))
                    stats.add(s, **({"kl": kl} if kl is not None else {}))
                    if updates == 0:
                        first_ratios.append(s.ratio.detach())
                micro += 1
                # 5. accumulated over grad_accum minibatches x kept steps: clip, AdamW step
                if micro % c.grad_accum == 0:
                    ctx.clip_grad(c.grad_clip)
                    self.opt.step()
                    self.opt.zero_grad(set_to_none=True)
                    updates += 1
        self.round += 1
        first = torch.cat([r.double().cpu() for r in first_ratios])
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), **stats.summary(),
                "ratio_first_mean": float(first.mean()), "ratio_first_std": float(first.std(unbiased=False)),
                "group_reward_std": float(groups.group_std.mean()), "zero_spread_frac": groups.zero_spread_fraction,
                **({"sde_window_start": sde[0]} if c.sde_window else {}), "updates": updates}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.round = state["round"]
