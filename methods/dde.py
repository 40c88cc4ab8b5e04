"""DDE: preference alignment via explicit Denoised Distribution Estimation -- variant ``dde/reconstructed``.

Shi, Wang, Li, Chu, "Preference Alignment for Diffusion Model via Explicit Denoised Distribution Estimation",
arXiv 2411.14871.  No official code exists and the paper's equations could not be read here (only its abstract
and summaries: docs/methods/dde.md), so this file is OUR RECONSTRUCTION from the paper's description, derived
below and named ``dde/reconstructed`` in every run's variant.  It is not the paper's exact formula.

What the paper says: DDE is DPO on terminal preference labels.  From the perspective of each step it estimates the
terminal denoised distribution p_theta(x_0) of the winner and the loser with two estimators, *stepwise* (the model's
step distribution estimated through the true posterior q(x_{t-1} | x_t, x_0), with an importance-ratio correction)
on the upper, noisier segment and *single-shot* (the model output turned into a terminal estimate by DDIM's x_0
prediction) on the final segment; one model inference per sample stands for the whole trajectory; the combination
gives a credit weight that peaks in the middle of the trajectory.

The derivation (epsilon prediction; a_t = alphas_cumprod[t], SNR_t = a_t / (1 - a_t), t = 0..T-1 the training
timesteps; D_t = -(m_t - r_t) with m_t, r_t the policy's and the reference's noise MSE at t, as Diffusion-DPO):

1. Stepwise.  With q(x_{t-1} | x_t, x_0) as the proposal for the model's step (the importance-sampling form of
   p_theta(x_0); its log by Jensen is the ELBO), the log-ratio log p_theta(x_0) - log p_ref(x_0) is, step by step,
   sum_t lambda_t D_t with the ELBO's weight.  We use its continuous-time form
   lambda_t = (log SNR_{t-1} - log SNR_t) / 2
   (Kingma, Salimans, Poole, Ho, "Variational Diffusion Models", arXiv 2107.00630: the epsilon-prediction ELBO
   weights each step by half its log-SNR drop).  It agrees with the discrete DDPM weight
   (SNR_{t-1}/SNR_t - 1)/2 where the steps are small, and stays finite at the cosine schedule's last, capped step,
   whose discrete weight (about 500) would take all the credit.
2. Single-shot.  DDIM's x_0 prediction x0hat = (x_t - sqrt(1 - a_t) eps_theta) / sqrt(a_t) gives
   p_theta(x_0 | x_t) = N(x0hat, s_t^2 I); since x_0 - x0hat = (eps_theta - eps) / sqrt(SNR_t),
   log p_theta(x_0 | x_t) - log p_ref(x_0 | x_t) = mu_t D_t with mu_t = 1 / (2 s_t^2 SNR_t).  ``single_shot_var``:
   ``posterior`` takes s_t^2 = the posterior variance of x_0 given x_t for data of per-element std ``data_std``,
   s_t^2 = data_std^2 / (1 + data_std^2 SNR_t) (so mu_t = 1/2 + 1 / (2 data_std^2 SNR_t)); ``fixed`` takes
   s_t = data_std.
3. The combination.  Split the trajectory at tau = ``split`` x (T - 1).  A perspective (a step t' from which the
   terminal distribution is estimated) at or below tau jumps to x_0 single-shot; a perspective above tau steps down
   the chain stepwise to tau and jumps from there.  Averaging the perspectives, a step t above tau is credited by
   every perspective that steps through it: lambda_t x (T - 1 - t) / (T - 1 - tau) once normalised at tau; a step
   at or below tau by its own single-shot estimate, kappa mu_t, with kappa = lambda_tau / mu_tau so the two segments
   meet at tau (the single-shot variance that makes both estimators agree at the split).  So
       w(t) = kappa mu_t                              (t <= tau)
       w(t) = lambda_t (T - 1 - t) / (T - 1 - tau)    (t > tau)
   rises along the final segment (mu grows with the noise), falls along the upper one (fewer perspectives above),
   and peaks at the split.  The paper says the middle peak arises from its estimators; in this reconstruction its
   place is the ``split`` setting.  That is the open question (docs/methods/dde.md).
4. The loss: Diffusion-DPO's with the weight: one t and one eps per pair shared by winner and loser,
       L = -log sigmoid( -(beta / 2) wbar(t) [ (m_w - r_w) - (m_l - r_l) ] ),   wbar = w / mean_t w,
   so that w = 1 (``weighting: uniform``) is Diffusion-DPO exactly.  ``t_sampling: importance`` draws t with
   probability wbar(t) / T and puts weight 1 inside instead (the same credit, applied outside the sigmoid).

The credit-assignment study compares ``weighting``: uniform (Diffusion-DPO), stepwise (lambda alone),
single-shot (mu alone) and dde on the same pairs, seeds and budget; ``credit_weights`` returns each curve.
"""
from __future__ import annotations

import torch

from diffalign import process
from diffalign.contract import POSITIVE, Choice, Real, rules
from diffalign.preference import (
    PAIR_DEFAULTS,
    PairSource,
    dpo_loss,
    pair_errors,
    pairs_split_refusal,
    step_metrics,
)
from diffalign.store import project_path

CONFIG_SECTION = "dde"
NEEDS_DIFFERENTIABLE_REWARD = False   # the reward only labels pairs
WEIGHTINGS = ("dde", "stepwise", "single-shot", "uniform")
T_SAMPLINGS = ("uniform", "importance")
SINGLE_SHOT_VARS = ("posterior", "fixed")
TINY_PAIRS = "models/tiny-pairs"
DEFAULTS = {
    "batch_size": 16,            # pairs per optimizer step
    "grad_accum": 1,
    "beta": 5000.0,
    "lr": 1e-4,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-2,
    "grad_clip": 1.0,
    "weighting": "dde",          # dde | stepwise | single-shot | uniform (= Diffusion-DPO)
    "split": 0.5,                # tau / (T - 1): the stepwise segment above, the single-shot segment at and below
    "single_shot_var": "posterior",  # posterior | fixed: s_t^2 of the single-shot Gaussian
    "data_std": 0.5,             # per-element std of x_0 (the single-shot variance's scale)
    "t_sampling": "uniform",     # uniform (the weight inside the sigmoid) | importance (t drawn in proportion to it)
    **PAIR_DEFAULTS,
}
RULES = rules(DEFAULTS, {"weighting": Choice(WEIGHTINGS), "split": Real(0.0, 1.0, lo_open=True, hi_open=True),
                         "single_shot_var": Choice(SINGLE_SHOT_VARS), "data_std": POSITIVE,
                         "t_sampling": Choice(T_SAMPLINGS)})
SMOKE = {"dde": ["dde.batch_size=8"]}
companion_baseline = None


def variant(cfg) -> str:
    d = cfg[CONFIG_SECTION]
    name = f"dde/reconstructed/weights-{d['weighting']}"
    if d["weighting"] == "dde":
        name += f"(split={d['split']:g})"
    if d["weighting"] in ("dde", "single-shot"):
        name += f"/single-shot-var-{d['single_shot_var']}(std={d['data_std']:g})"
    if d["weighting"] != "uniform":
        name += f"/t-{d['t_sampling']}"
    pairs = d["pairs"] if d["pairs"] in ("base", "online", "tiny-pairs") else "file"
    return name + f"/pairs-{pairs}" + (f"/label-noise-{d['label_noise']:g}" if d["label_noise"] else "")


def validate(cfg) -> None:
    """No key of this section depends on another (each key's range, the pair keys' included, is its rule in RULES)."""


def data_parallel(cfg, world: int) -> str | None:
    """Each process takes its rows of every batch of pairs (fixed pair sets only)."""
    return pairs_split_refusal(CONFIG_SECTION, cfg[CONFIG_SECTION])


# ---- the credit weights ------------------------------------------------------------------------------------

def component_weights(scheduler, data_std: float = 0.5, single_shot_var: str = "posterior") -> dict[str, torch.Tensor]:
    """lambda_t (stepwise, continuous-time ELBO) and mu_t (single-shot) over the training timesteps
    (``process.levels``), float64, as weights on the noise error.

    On a flow the derivation is the same on the log-SNR axis (``process.log_snr``: 2 log((1 - s) / s)); its one end
    without a finite log-SNR, s = 1 (pure noise), takes the value extrapolated from its two neighbours, as t = 0's
    log SNR_{t-1} is here.  ``credit_weights`` carries the weights to the flow's velocity error."""
    log_snr = process.log_snr(scheduler, process.levels(scheduler))
    if not torch.isfinite(log_snr[-1]):
        log_snr[-1] = 2 * log_snr[-2] - log_snr[-3]
    before = torch.cat([(2 * log_snr[0] - log_snr[1]).view(1), log_snr[:-1]])  # log SNR_{t-1}, extrapolated at t = 0
    lam = 0.5 * (before - log_snr)
    snr = log_snr.exp()
    if single_shot_var == "posterior":
        var = data_std ** 2 / (1 + data_std ** 2 * snr)
    else:
        var = torch.full_like(snr, data_std ** 2)
    return {"stepwise": lam, "single-shot": 1 / (2 * var * snr)}


def credit_weights(scheduler, cfg) -> torch.Tensor:
    """The per-timestep credit w(t) over the training timesteps (``process.levels``: t = 0..T-1, or 1..T on a flow),
    as the weight on the model's own denoising error, normalised to mean 1 (float64).

    The derivation above weighs the noise error D_t; on a flow the pairs' errors are velocity errors, and
    ||eps_hat - eps||^2 = (1 - s)^2 ||v_hat - v||^2 (``process.eps_error_scale``), so there w(t) is the noise-error
    weight times (1 - s)^2, then normalised (``uniform`` stays 1: Diffusion-DPO on the velocity error).

    ``cfg`` is a run config (the ``dde`` section is read) or that section alone."""
    d = cfg[CONFIG_SECTION] if CONFIG_SECTION in cfg else cfg
    t_all = process.levels(scheduler)
    T = len(t_all)
    if d["weighting"] == "uniform":
        return torch.ones(T, dtype=torch.float64)
    parts = component_weights(scheduler, d["data_std"], d["single_shot_var"])
    if d["weighting"] in parts:
        w = parts[d["weighting"]]
    else:
        lam, mu = parts["stepwise"], parts["single-shot"]
        tau = int(round(d["split"] * (T - 1)))
        t = torch.arange(T, dtype=torch.float64)
        w = torch.where(t <= tau, lam[tau] / mu[tau] * mu, lam * (T - 1 - t) / (T - 1 - tau))
    w = w * process.eps_error_scale(scheduler, t_all)
    return w / w.mean()


# ---- the method --------------------------------------------------------------------------------------------

class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        self.opt = ctx.adamw()
        self.weights = credit_weights(ctx.pipe.scheduler, self.cfg).float()
        self.pairs = PairSource(self.cfg, ctx.pipe, ctx.reward, ctx.cfg.reward, ctx.train_prompts, ctx.cfg.sampler,
                                ctx.costs, ctx.cfg.seed, project_path(TINY_PAIRS))

    def draw_timesteps(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t per pair and the weight inside the sigmoid: uniform t with wbar(t), or t ~ wbar / T with 1."""
        g, sched = self.ctx.generator, self.ctx.pipe.scheduler
        first = int(process.levels(sched)[0])  # weights[i] is the credit of training timestep first + i
        if self.cfg.t_sampling == "importance":
            t = torch.multinomial(self.weights, n, replacement=True, generator=g) + first
            return t, torch.ones(n)
        t = process.draw_timesteps(sched, n, g)
        return t, self.weights[t - first]

    def step(self) -> dict:
        ctx, c, pipe = self.ctx, self.cfg, self.ctx.pipe
        losses, inside, ts = [], [], []
        for _ in range(c.grad_accum):
            # 1. a batch of pairs
            prompts, x0_w, x0_l = self.pairs.draw(c.batch_size, ctx.generator)
            if not prompts:  # online: every pair a tie
                continue
            n = len(prompts)
            # 2. one t per pair (and its credit), one eps per pair, shared by winner and loser
            t, weight = self.draw_timesteps(n)
            noise = torch.randn(x0_w.shape, generator=ctx.generator, dtype=torch.float32).to(x0_w)
            # (several processes: each takes its rows of the batch; the loss is their mean, gradients averaged)
            prompts, x0_w, x0_l, t, weight, noise = (ctx.local(v) for v in (prompts, x0_w, x0_l, t, weight, noise))
            cond = pipe.encode_prompts(prompts)
            # 3. the policy's and the reference's denoising errors: D_t = -(m_t - r_t) for winner and loser
            m_w, m_l, r_w, r_l = pair_errors(pipe, x0_w, x0_l, t, noise, cond, ctx.costs)
            # 4. DPO on DDE's estimate of the log-likelihood ratio: the credit wbar(t) inside the sigmoid
            out = dpo_loss(m_w, m_l, r_w, r_l, c.beta, weight)
            ctx.backward(out.loss / c.grad_accum)
            losses.append(float(out.loss.detach()))
            inside.append(ctx.gather(out.inside).cpu())
            ts.append(ctx.gather(t.float()))
        # 5. clip, AdamW
        grad_norm = ctx.clip_grad(c.grad_clip) if losses else 0.0
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        out = step_metrics(losses, inside, grad_norm)
        return {**out, "mean_t": float(torch.cat(ts).mean())} if ts else out

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
