"""RWR: reward-weighted regression, the simplest baseline of the DDPO paper's figures.

Lee, Liu, Ryu, Watkins, Du, Boutilier, Abbeel, Ghavamzadeh, Gu, "Aligning Text-to-Image Models using Human
Feedback", arXiv 2302.12192 (reward-weighted likelihood maximisation); run online, round after round, as the
baseline of DDPO (Black, Janner, Du, Kostrikov, Levine, arXiv 2305.13301, which names the two weightings below).

The denoising loss stands in for -log p_theta(x_0 | c), so maximising the reward-weighted likelihood of the model's
own samples is minimising their reward-weighted denoising loss; no log-probabilities, no trajectories, only the
final samples and their rewards:

    repeat
        c_1..c_B ~ train prompts,  x_T ~ N(0, I)            (per-prompt: k prompts x B/k samples each)
        x0_i     <- DDIM(x_T, c; theta)                     (no gradients: the current model's samples, as latents)
        r_i      <- R(x0_i, c_i)
        w_i      <- exp(r_i / tau) / sum_j exp(r_j / tau)   (exponential)   or   1[r_i in the top q] / #top (sparse)
                    (per-prompt: within each prompt's group, each group weighing 1/k)
        for each of K inner updates:
            t_i ~ U{0..T-1},  eps_i ~ N(0, I),  x_t^i = sqrt(abar_t) x0_i + sqrt(1 - abar_t) eps_i
            L   <- sum_i w_i ||target_i - eps_theta(x_t^i, t_i, c_i)||^2 / D     (target: eps, or v)
            theta <- AdamW(theta, clip(grad L, grad_clip))

Which denoiser is trained (``loss_on``; a choice the papers leave open, recorded in the variant):

- ``guided`` (the default): the policy is the sampler, and the sampler's denoiser is the classifier-free guided
  output eps_u + w (eps_c - eps_u) (the same one DDPO takes as its policy's mean), so that is the eps_theta above:
  the loss is the denoising loss of the model that produced the samples.  Both UNet branches get gradients.
- ``conditional``: eps_c alone, as in pretraining; the samples were drawn with guidance w, so the conditional branch
  is then pulled toward the guided distribution and guidance applies on top of it again at sampling time.

The weights are normalised over the whole sampled round (every process's rows), so they sum to one; the code writes
the loss as the mean over rows of (B w_i) * l_i, the same number, which averages over processes like every other
loss.  The samples are the sampler's final latents (no decode / encode round trip).  Grouping the round by prompt
(``prompts_per_step`` = k) compares each sample with others of its own prompt, so an easy prompt's samples do not
take the whole round's weight.  The effective sample size 1 / sum_i w_i^2 is logged: a small tau collapses the
update onto one sample per round.  RWR has no KL term: it drifts from the base model as far as the reward and the
noise of its updates pull it; its KL to base and prompt fidelity are in the evaluation like every other method's.

Variants (``variant`` records which ran): ``rwr/exp(tau=..)`` or ``rwr/sparse(top=..)``, ``/per-prompt(k)`` when
grouped, ``/K=..`` inner updates per round, ``/loss-guided`` or ``/loss-conditional``.  The preset
(``bench/presets/rwr.yaml``, its trials in docs/methods/rwr.md) keeps the best 2 of each prompt's 8 samples.
"""
from __future__ import annotations

import torch

from diffalign.contract import BATCH, MAX_BATCH, POSITIVE, Choice, Int, Real, rules
from diffalign.errors import BenchError
from diffalign.process import add_noise, draw_timesteps, training_target
from diffalign.sampling import guided_eps, sample

CONFIG_SECTION = "rwr"
NEEDS_DIFFERENTIABLE_REWARD = False   # the reward only weights the samples
WEIGHTINGS = ("exponential", "sparse")
LOSS_ON = ("guided", "conditional")
DEFAULTS = {
    "samples_per_step": 16,       # samples drawn (and scored) per round
    "prompts_per_step": 0,        # 0: a prompt per sample, weights over the round | k: k prompts x samples/k each,
                                  #    weights within each prompt's group (each group weighs 1/k)
    "inner_updates": 2,           # weighted denoising updates per round, each on fresh t and eps
    "loss_on": "guided",          # guided: the sampler's CFG output is the denoiser trained | conditional: cond alone
    "weighting": "exponential",   # exponential: w = softmax(r / tau) | sparse: the top fraction, equally weighted
    "temperature": 0.1,           # tau, in units of the reward
    "top_fraction": 0.25,         # sparse: the fraction of each round kept
    "lr": 1e-3,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-4,
    "grad_clip": 1.0,
}
RULES = rules(DEFAULTS, {"samples_per_step": BATCH, "prompts_per_step": Int(0, MAX_BATCH),
                         "inner_updates": Int(1, 1000), "loss_on": Choice(LOSS_ON), "weighting": Choice(WEIGHTINGS),
                         "temperature": POSITIVE,
                         "top_fraction": Real(0.0, 1.0, lo_open=True)})
SMOKE = {"rwr": ["rwr.samples_per_step=8", "rwr.top_fraction=0.5"]}  # bench regress's short run: the best of 2
companion_baseline = None


def variant(cfg) -> str:
    d = cfg[CONFIG_SECTION]
    w = f"exp(tau={d['temperature']:g})" if d["weighting"] == "exponential" else f"sparse(top={d['top_fraction']:g})"
    groups = f"/per-prompt({d['prompts_per_step']})" if d["prompts_per_step"] else ""
    return f"rwr/{w}{groups}/K={d['inner_updates']}/loss-{d['loss_on']}"


def validate(cfg) -> None:
    d = cfg[CONFIG_SECTION]
    n, k = d["samples_per_step"], d["prompts_per_step"]
    if k and n % k:
        raise BenchError(f"rwr.prompts_per_step ({k}) must divide rwr.samples_per_step ({n}); accepted: 0 (a prompt "
                         "per sample) or a divisor")
    if d["weighting"] == "sparse" and round(d["top_fraction"] * (n // k if k else n)) < 1:
        raise BenchError(f"rwr.top_fraction {d['top_fraction']:g} of {n // k if k else n} samples keeps none; "
                         "accepted: top_fraction x samples per group >= 0.5")


def data_parallel(cfg, world: int) -> str | None:
    """Each process samples and trains its rows of the round; the weights use the gathered rewards: any config."""
    return None


def reward_weights(rewards: torch.Tensor, weighting: str, temperature: float, top_fraction: float,
                   groups: int = 1) -> torch.Tensor:
    """w_i over one round's rewards (float64, summing to one): softmax(r / tau), or 1 / k on the k = round(q B) best
    (ties broken by position, the first kept).  ``groups`` > 1: the round is that many consecutive groups (a prompt
    each); the weights are taken within each group and each group weighs 1 / groups."""
    if groups > 1:
        parts = rewards.reshape(groups, -1)
        return torch.cat([reward_weights(p, weighting, temperature, top_fraction) for p in parts]) / groups
    r = rewards.double()
    if weighting == "exponential":
        return torch.softmax(r / temperature, 0)
    if weighting == "sparse":
        k = max(1, round(top_fraction * len(r)))
        keep = torch.zeros_like(r)
        keep[torch.sort(r, descending=True, stable=True).indices[:k]] = 1.0
        return keep / k
    raise ValueError(f"weighting {weighting!r}: accepted {WEIGHTINGS}")


def effective_sample_size(w: torch.Tensor) -> float:
    """1 / sum w_i^2 for weights summing to one: B for equal weights, 1 when one sample carries them all."""
    return float(1.0 / (w.double() ** 2).sum())


class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        self.opt = ctx.adamw()

    def step(self) -> dict:
        ctx, c, pipe, sampler = self.ctx, self.cfg, self.ctx.pipe, self.ctx.cfg.sampler
        sched, n = pipe.scheduler, c.samples_per_step
        # 1. c ~ train prompts, x_T ~ N(0, I); x0 <- DDIM(x_T, c; theta) without gradients (this process's rows)
        prompts, x_T, noise_gen = ctx.batch(n, c.prompts_per_step)
        traj = sample(pipe, prompts, x_T, sampler.num_steps, sampler.guidance, sampler.eta, generator=noise_gen,
                      costs=ctx.costs)
        x0 = traj.latents[:, -1]
        # 2. r <- R(x0, c); 3. w <- the weighting, over the whole round (several processes: gathered)
        rewards = ctx.gather(ctx.score(traj.images, prompts).detach().float()).cpu()
        w = reward_weights(rewards, c.weighting, c.temperature, c.top_fraction, max(1, c.prompts_per_step))
        w_local = (ctx.local(w) * n).float().to(x0.device)  # B w_i: the loss below is a mean over rows
        losses, norms = [], []
        for _ in range(c.inner_updates):
            # 4. t ~ U{0..T-1}, eps ~ N(0, I) for the whole round (this process's rows), x_t
            t = ctx.local(draw_timesteps(sched, n, ctx.generator))
            eps = ctx.local(torch.randn((n, *x0.shape[1:]), generator=ctx.generator, dtype=torch.float32)).to(x0)
            x_t = add_noise(sched, x0, t, eps)
            # 5. L = sum_i w_i ||target - eps_theta(x_t, t, c)||^2 / D  (eps_theta: the guided output, or cond alone)
            guided = c.loss_on == "guided" and traj.uncond is not None
            out = guided_eps(pipe.unet, x_t, t.to(pipe.device), traj.cond, traj.uncond if guided else None,
                             sampler.guidance if guided else 1.0, ctx.costs, with_grad=True)
            per_sample = (out.float() - training_target(sched, x0, t, eps).float()).pow(2).flatten(1).mean(1)
            loss = (w_local * per_sample).mean()
            ctx.backward(loss)
            # 6. theta <- AdamW(theta, clip(grad L))
            norms.append(ctx.clip_grad(c.grad_clip))
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
                "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms),
                "weight_max": float(w.max()), "ess": effective_sample_size(w)}

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
