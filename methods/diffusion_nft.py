"""DiffusionNFT: online reinforcement of a diffusion / flow model on its forward process (negative-aware fine-tuning).

Zheng, Chen, Ye, Wang, Zhang, Jiang, Su, Ermon, Zhu, Liu, "DiffusionNFT: Online Diffusion Reinforcement with Forward
Process", arXiv 2509.16117 (ICLR 2026; code NVlabs/DiffusionNFT).  No likelihoods, no trajectories, no SDE: the old
policy samples clean images with any solver, a reward turns each into an optimality probability r in [0, 1], and the
model is trained with the flow-matching loss on the forward process, split into an implicit positive and an
implicit negative policy that share one network:

    repeat                                                       (one harness step = one round k = 0, 1, ...)
        1. c_1..c_K ~ train prompts, each G times (a group);  x_T ~ N(0, I)
           x0 <- solver(x_T, c; v_old)        the OLD policy's weights, no gradients; any solver (the suite's ODE /
                                              DDIM sampler at sampler.eta = 0), guidance sampler.guidance
        2. R_i = R(x0_i, c_i)
        3. A_i = (R_i - mean_g) / (std + eps)  (mean over i's group; std: the group's, or the whole round's: ``std``)
           r_i = 1/2 + 1/2 clip(A_i / adv_clip, -1, 1)           (optimality probability; 0 in a zero-spread group
                                                                   is A = 0: r = 1/2, no preference)
        4. for each of ``inner_updates`` updates:
               t_i ~ U(levels), eps_i ~ N(0, I),  x_t = (1 - s) x0 + s eps   (process.add_noise; s = t / T)
               v_i = eps_i - x0_i                (process.training_target: the model's own target on a DDPM model)
               v_old = v_{theta_old}(x_t, t, c)  (no gradients),  v_theta = v_theta(x_t, t, c)
               v_plus  = (1 - b) v_old + b v_theta        (implicit positive policy)
               v_minus = (1 + b) v_old - b v_theta        (implicit negative policy, the reflection of v_plus)
               L = mean_i [ r_i l(v_plus_i, v_i) + (1 - r_i) l(v_minus_i, v_i) ]
                   l: ||. - v||^2 / D (``uniform``), or the x0-space error self-normalised (``adaptive``, below)
               + kl_coeff mean_i ||v_theta - v_ref||^2 / D        (v_ref: LoRA off; released code: 1e-4; 0 = off)
               theta <- AdamW(theta, clip(grad L))
        5. theta_old <- eta_k theta_old + (1 - eta_k) theta,  eta_k = min(old_decay_rate * k', old_decay_max)
           (k' = optimizer updates so far: the "soft update" of the old policy; eta = 0 is old = theta at the start of
           every round)

Why the optimum is the reward-weighted policy (the paper's policy-improvement result, Sec. 3; its theorem and
equation numbers are not quoted here because the text we could read did not carry them).  Per (x_t, c, t) write
u = v_theta - v_old and d = v_old - v.  Then v_plus - v = d + b u and v_minus - v = d - b u, so the per-sample
uniform loss r |d + b u|^2 + (1 - r) |d - b u|^2 has gradient 2 b [ (2 r - 1) d + b u ] in u, zero at

    v_theta* = v_old + (2 r - 1) (v - v_old) / b       (r = 1: v_old + (v - v_old) / b, i.e. v_plus* = v)

Averaged over the x0 that reach x_t (E[v | x_t] = v_old under the old policy's forward process), this is
v* = v_old + (2 / b) alpha (v_plus - v_old), alpha = E[r | x_t] and v_plus the velocity of the reward-tilted
distribution pi_+(x0 | c) ~ r(x0, c) pi_old(x0 | c): the new field moves the old one toward the positive
(reward-weighted) distribution and away from the negative one, with step 1 / b.  r = 1/2 is neutral (the optimum
is v_old).  Because x0-, eps- and v-predictions are affine in one another with coefficients that depend on t
alone, the same loss in an epsilon-predicting DDPM model's own parameterisation (its training target) has the same
optimum read in that parameterisation: the method runs on both worlds unchanged.  Before any update with eta = 0,
v_theta = v_old and the gradient is -2 b (2 r - 1)(v - v_old) dv/dtheta: an advantage-weighted flow-matching step.

``adaptive`` (the released code's loss; "adaptive loss weighting" in the paper): each branch's x0 prediction
x0_hat = x_t - s v_branch (process.x0_and_eps) is compared with x0, and its squared error is divided by its own
detached mean absolute error (per sample, at least 1e-5): l = mean (x0_hat - x0)^2 / sg(mean |x0_hat - x0|).  It
has the same minimiser per sample as the uniform loss (a positive per-sample weight), and evens out the loss scale
across noise levels.  The released code also multiplies the loss by adv_clip / b, a constant that AdamW's update
is invariant to (up to its eps and the gradient clip); we leave it out.

Choices named here (the variant records them): the old policy is a copy of the trainable weights (the LoRA), soft
updated after each round as in the released code (eta_k = min(0.001 k, 0.5) there, k the optimizer step; ``old=``
in the variant); the samples are drawn with the old weights.  CFG: the paper samples and trains CFG-free (guidance
1, the conditional velocity); here the trained velocity is the sampler's, v = v_u + w (v_c - v_u) at
``sampler.guidance`` w (both branches trained when w != 1, as RWR's ``loss_on: guided``), so a run at the tiny
world's guidance 3 trains the guided field it samples from, and w = 1 is the paper's CFG-free form, the preset's
(recorded as ``cfg-free`` / ``guided(w=..)``; the evaluation keeps the suite's guidance).  Training times are
uniform over the process's levels (the released code trains on the sampler's own 10-step schedule times; the loss
is the flow-matching expectation over t, which uniform draws estimate).  The released code's per-prompt mean with
the round's global std is ``std: global`` (its default); the group's own std is ``std: group``.

Logged: ``reward_mean`` / ``reward_std``, ``r_mean`` / ``r_std`` (the optimality probabilities), ``r_saturated``
(the fraction with |A| >= adv_clip), ``zero_spread_frac`` (groups whose rewards are all equal: r = 1/2, no signal),
``group_reward_std``, ``loss`` / ``loss_pos`` / ``loss_neg`` (the two branches, unweighted means), ``old_dev``
(mean ||v_theta - v_old||^2 / D over the round's updates: 0 on the first update of a round with eta = 0),
``old_decay`` (the eta of this round's soft update), ``grad_norm``, ``kl`` (when kl_coeff > 0).

Data parallel: each process samples its rows of the round, the rewards are gathered so every process computes the
same r over whole groups, and each trains its rows (the context averages the gradients); the old weights are a
copy on every process and stay equal.  Any config whose round divides over the processes.
"""
from __future__ import annotations

import dataclasses

import torch

from diffalign import process
from diffalign.contract import MAX_BATCH, NONNEG, POSITIVE, Choice, Int, Real, rules
from diffalign.errors import BenchError
from diffalign.policy_gradient import group_advantages
from diffalign.sampling import base_model, guided_eps, sample, weights

CONFIG_SECTION = "nft"
NEEDS_DIFFERENTIABLE_REWARD = False   # the reward only sets r
STDS = ("global", "group")
WEIGHTINGS = ("adaptive", "uniform")
DEFAULTS = {
    "group_size": 8,             # G: samples per prompt (a group)
    "prompts_per_step": 4,       # K: groups per round (K x G samples, one sampler call)
    "inner_updates": 1,          # optimizer updates per round, each on the whole round with fresh t and eps
    "beta": 1.0,                 # b: the implicit policies' step (the released default 1.0; its OCR config 0.1)
    "adv_clip": 5.0,             # r = 1/2 + 1/2 clip(A / adv_clip, -1, 1) (released: A clipped at 5, divided by 5)
    "std": "global",             # the normaliser of A: the round's std (released default) | the group's own
    "std_eps": 1e-4,
    "weighting": "adaptive",     # adaptive: x0 error / sg(mean |x0 error|) (released code) | uniform: ||v - v_hat||^2
    "old_decay_rate": 0.001,     # eta_k = min(rate x k, max): the old policy's soft update after each round ...
    "old_decay_max": 0.5,        # ... (0, 0: the old policy is the weights at the start of each round)
    "kl_coeff": 0.0,             # mean ||v_theta - v_ref||^2 to the base model (released: 1e-4); 0: no ref pass
    "lr": 3e-4,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-4,
    "grad_clip": 1.0,
}
RULES = rules(DEFAULTS, {"group_size": Int(2, 1024), "prompts_per_step": Int(1, MAX_BATCH),
                         "inner_updates": Int(1, 1000), "beta": POSITIVE, "adv_clip": POSITIVE, "std": Choice(STDS),
                         "std_eps": POSITIVE, "weighting": Choice(WEIGHTINGS), "old_decay_rate": Real(0.0, 1.0),
                         "old_decay_max": Real(0.0, 1.0, hi_open=True), "kl_coeff": NONNEG})
SMOKE = {"diffusion-nft": ["nft.group_size=4", "nft.prompts_per_step=2"]}  # bench regress: 2 prompts x 4 samples
companion_baseline = None


def old_tag(d) -> str:
    if d["old_decay_rate"] == 0 or d["old_decay_max"] == 0:
        return "old=round-start"
    return f"old=soft(eta=min({d['old_decay_rate']:g}k,{d['old_decay_max']:g}))"


def variant(cfg) -> str:
    d, s = cfg[CONFIG_SECTION], cfg["sampler"]
    r_map = f"r=half+half*clip(A/{d['adv_clip']:g})(A:group-mean,{d['std']}-std+{d['std_eps']:g})"
    cfg_tag = "cfg-free" if s["guidance"] == 1 else f"guided(w={s['guidance']:g})"
    solver = f"ode(steps={s['num_steps']})" if s["eta"] == 0 else f"sde(eta={s['eta']:g},steps={s['num_steps']})"
    return "/".join([
        "diffusion-nft", f"G={d['group_size']}x{d['prompts_per_step']}-prompts", r_map, f"beta={d['beta']:g}",
        f"loss-{d['weighting']}", old_tag(d), f"K={d['inner_updates']}", cfg_tag, f"sampler={solver}",
        f"kl(coeff={d['kl_coeff']:g})" if d["kl_coeff"] else "no-kl"])


def validate(cfg) -> None:
    d = cfg[CONFIG_SECTION]
    if d["group_size"] * d["prompts_per_step"] > MAX_BATCH:
        raise BenchError(f"nft.group_size x nft.prompts_per_step ({d['group_size'] * d['prompts_per_step']}) "
                         f"exceeds {MAX_BATCH} samples a round")


def data_parallel(cfg, world: int) -> str | None:
    """Each process samples and trains its rows of the round; r uses the gathered rewards: any config whose round
    divides over the processes (the context refuses the others with one line)."""
    return None


# ---- step 3: rewards -> optimality probabilities ----------------------------------------------------------------

@dataclasses.dataclass
class Optimality:
    r: torch.Tensor            # (n,) float64 in [0, 1]
    advantages: torch.Tensor   # (n,) float64: A before the clip
    group_std: torch.Tensor    # (n / G,) float64, population std
    zero_spread: torch.Tensor  # (n / G,) bool

    @property
    def zero_spread_fraction(self) -> float:
        return float(self.zero_spread.double().mean())


def optimality(rewards: torch.Tensor, group_size: int, std: str = "global", std_eps: float = 1e-4,
               adv_clip: float = 5.0) -> Optimality:
    """r_i = 1/2 + 1/2 clip(A_i / adv_clip, -1, 1), A_i = (R_i - mean_g) / (sigma + std_eps), with mean_g the mean
    of i's group (consecutive rows of ``group_size``) and sigma the population std of the group (``group``) or of the
    whole round (``global``).  A group whose rewards are all equal gets A = 0 exactly (r = 1/2)."""
    groups = group_advantages(rewards, group_size, std_eps)  # GRPO's group stds and zero-spread groups
    r = rewards.detach().double().cpu().reshape(-1)
    g = r.reshape(-1, group_size)
    if std == "group":
        sigma = groups.group_std.unsqueeze(1)
    elif std == "global":
        sigma = r.std(unbiased=False)
    else:
        raise ValueError(f"std {std!r}: accepted {STDS}")
    adv = (g - g.mean(1, keepdim=True)) / (sigma + std_eps)   # float64
    adv = torch.where(groups.zero_spread.unsqueeze(1), torch.zeros_like(adv), adv).reshape(-1)
    prob = 0.5 + 0.5 * (adv / adv_clip).clamp(-1.0, 1.0)
    return Optimality(prob, adv, groups.group_std, groups.zero_spread)


# ---- step 4: the loss --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class NFTLoss:
    loss: torch.Tensor   # scalar: mean_i [r_i l+_i + (1 - r_i) l-_i]
    pos: torch.Tensor    # (n,) l(v_plus, v), detached
    neg: torch.Tensor    # (n,) l(v_minus, v), detached


def _branch(pred: torch.Tensor, target: torch.Tensor, weighting: str, to_x0=None, x0=None) -> torch.Tensor:
    """Per-sample loss of one implicit policy's prediction: mean squared error (``uniform``), or the x0-space squared
    error over its detached mean absolute error (``adaptive``)."""
    if weighting == "uniform":
        return (pred - target).pow(2).flatten(1).mean(1)
    if weighting != "adaptive":
        raise ValueError(f"weighting {weighting!r}: accepted {WEIGHTINGS}")
    err = (to_x0(pred) - x0).flatten(1)
    scale = err.detach().double().abs().mean(1).clamp(min=1e-5).to(err.dtype)
    return err.pow(2).mean(1) / scale


def nft_loss(v_theta: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float,
             weighting: str = "uniform", to_x0=None, x0: torch.Tensor | None = None) -> NFTLoss:
    """DiffusionNFT's loss: v_plus = (1 - b) v_old + b v_theta, v_minus = (1 + b) v_old - b v_theta,
    L = mean_i [r_i l(v_plus_i, target_i) + (1 - r_i) l(v_minus_i, target_i)] (``v_old`` is detached here).
    ``adaptive`` needs ``to_x0`` (a prediction -> its x0 prediction) and ``x0``."""
    v_old = v_old.detach()
    v_plus = (1 - beta) * v_old + beta * v_theta
    v_minus = (1 + beta) * v_old - beta * v_theta
    pos = _branch(v_plus, target, weighting, to_x0, x0)
    neg = _branch(v_minus, target, weighting, to_x0, x0)
    r = r.to(pos.dtype)
    return NFTLoss(loss=(r * pos + (1 - r) * neg).mean(), pos=pos.detach(), neg=neg.detach())


# ---- the old policy: a copy of the trainable weights ------------------------------------------------------------

def old_decay(d, updates: int) -> float:
    """eta after ``updates`` optimizer updates: min(old_decay_rate x updates, old_decay_max)."""
    return min(d["old_decay_rate"] * updates, d["old_decay_max"])


class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        self.opt = ctx.adamw()
        self.params = list(ctx.trainable)
        self.old = [p.detach().clone() for p in self.params]   # theta_old = theta at the start
        self.updates = 0                                         # optimizer updates so far (the soft update's clock)

    def step(self) -> dict:
        ctx, c, pipe, sampler = self.ctx, self.cfg, self.ctx.pipe, self.ctx.cfg.sampler
        sched, G = pipe.scheduler, c.group_size
        n = G * c.prompts_per_step
        # 1. K prompts x G samples, drawn by the OLD policy with the sampler (no gradients; this process's rows)
        prompts, x_T, noise_gen = ctx.batch(n, c.prompts_per_step)
        with weights(self.params, self.old):
            traj = sample(pipe, prompts, x_T, sampler.num_steps, sampler.guidance, sampler.eta, generator=noise_gen,
                          costs=ctx.costs)
        x0 = traj.latents[:, -1]
        # 2. R = R(x0, c), gathered;  3. r = 1/2 + 1/2 clip(A / adv_clip), A within each prompt's group
        rewards = ctx.gather(ctx.score(traj.images, prompts).detach().float()).cpu()
        opt = optimality(rewards, G, c.std, c.std_eps, c.adv_clip)
        r_local = ctx.local(opt.r).float().to(x0.device)
        guided = traj.uncond is not None
        w = sampler.guidance if guided else 1.0
        stats: dict[str, list[float]] = {"loss": [], "loss_pos": [], "loss_neg": [], "old_dev": [], "grad_norm": [],
                                         "kl": []}
        for _ in range(c.inner_updates):
            # 4. t ~ U(levels), eps ~ N(0, I), x_t on the forward process; the target v (the model's own)
            t = ctx.local(process.draw_timesteps(sched, n, ctx.generator))
            eps = ctx.local(torch.randn((n, *x0.shape[1:]), generator=ctx.generator, dtype=torch.float32)).to(x0)
            x_t = process.add_noise(sched, x0, t, eps)
            target = process.training_target(sched, x0, t, eps).float()
            td = t.to(pipe.device)
            with torch.no_grad(), weights(self.params, self.old):
                v_old = guided_eps(pipe.unet, x_t, td, traj.cond, traj.uncond, w, ctx.costs).float()
            v_theta = guided_eps(pipe.unet, x_t, td, traj.cond, traj.uncond, w, ctx.costs, with_grad=True).float()
            out = nft_loss(v_theta, v_old, target, r_local, c.beta, c.weighting,
                           to_x0=lambda v: process.x0_and_eps(sched, v, t, x_t.float())[0], x0=x0.float())
            loss = out.loss
            if c.kl_coeff > 0:  # the released code's small pull toward the base model (LoRA off)
                with torch.no_grad(), base_model(pipe.unet) as base_unet:
                    v_ref = guided_eps(base_unet, x_t, td, traj.cond, traj.uncond, w, ctx.costs).float()
                kl = (v_theta - v_ref).pow(2).flatten(1).mean(1).mean()
                loss = loss + c.kl_coeff * kl
                stats["kl"].append(float(kl.detach()))
            ctx.backward(loss)
            stats["grad_norm"].append(ctx.clip_grad(c.grad_clip))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.updates += 1
            stats["loss"].append(float(out.loss.detach()))
            stats["loss_pos"].append(float(out.pos.mean()))
            stats["loss_neg"].append(float(out.neg.mean()))
            stats["old_dev"].append(float((v_theta.detach() - v_old).pow(2).flatten(1).mean(1).mean()))
        # 5. the old policy's soft update: theta_old <- eta theta_old + (1 - eta) theta
        eta = old_decay(c, self.updates)
        with torch.no_grad():
            for o, p in zip(self.old, self.params):
                o.copy_(eta * o + (1 - eta) * p.detach() if eta else p.detach())
        metrics = {k: sum(v) / len(v) for k, v in stats.items() if v}
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()), **metrics,
                "r_mean": float(opt.r.mean()), "r_std": float(opt.r.std(unbiased=False)),
                "r_saturated": float((opt.advantages.abs() >= c.adv_clip).double().mean()),
                "zero_spread_frac": opt.zero_spread_fraction, "group_reward_std": float(opt.group_std.mean()),
                "old_decay": eta}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "old": [o.clone() for o in self.old], "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        with torch.no_grad():
            for o, s in zip(self.old, state["old"]):
                o.copy_(s)
        self.updates = state["updates"]
