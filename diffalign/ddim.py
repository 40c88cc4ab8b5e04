"""One DDIM step, its Gaussian log-density and the KL between two such steps.

Song, Meng, Ermon, "Denoising Diffusion Implicit Models", arXiv 2010.02502.  Notation map (paper -> code;
alpha is the *cumulative* product, diffusers' ``alphas_cumprod``, the paper's alpha_t):

    alpha_t, alpha_{t-1}     a_t, a_prev        (a_prev = final_alpha_cumprod past the last step)
    epsilon_theta(x_t)       eps                (from the model output and prediction_type)
    f_theta(x_t) = x0_hat    x0                 "predicted x0", eq. (9); clipped if the scheduler says so
    sigma_t(eta)             std                eq. (16): eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)
    x_{t-1}                  prev               eq. (12): sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z

so that p(x_{t-1} | x_t) = N(mean, sigma^2 I) with mean = the first two terms of eq. (12).  With eta = 0 this is
exactly ``diffusers.DDIMScheduler.step`` (``tests/diffalign/test_ddim.py``).  Coefficients are computed in float64
and cast to the latents' dtype.

The log-prob is reduced over latent elements by ``"mean"`` (what ddpo-pytorch and trl do, and what a PPO clip
range of 1e-4 assumes) or ``"sum"`` (the true log-density); the choice is a named option recorded in every run's
config.
"""
from __future__ import annotations

import dataclasses
import math

import torch

LOGPROB_REDUCTIONS = ("mean", "sum")


def set_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    """The scheduler's ``num_steps`` timesteps, in sampling order (the first is the noisiest)."""
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.clone()


def alphas(scheduler, t, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cumulative alphas a_t and a_prev (at t - T_train / num_steps), as float64 tensors shaped like t."""
    t = torch.as_tensor(t).long().cpu()
    prev_t = t - scheduler.config.num_train_timesteps // num_steps
    abar = scheduler.alphas_cumprod.double()
    a_t = abar[t]
    final = torch.as_tensor(scheduler.final_alpha_cumprod).double()
    a_prev = torch.where(prev_t >= 0, abar[prev_t.clamp(min=0)], final)
    return a_t, a_prev


def sigma(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta), eq. (16)."""
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def step_std(scheduler, t, num_steps: int, eta: float) -> torch.Tensor:
    return sigma(*alphas(scheduler, t, num_steps), eta)


@dataclasses.dataclass
class ShardedGenerator:
    """The run's generator as one process of a data-parallel run holds it: every draw is made for the whole global
    batch (``total`` rows) and this process keeps its ``rows``, so 1 and N processes give a sample the same noise."""
    generator: torch.Generator
    total: int
    rows: slice


@dataclasses.dataclass
class TiledGenerator:
    """A generator whose every draw is made for ``rows`` rows and repeated ``times`` times (row-major blocks): groups
    of a batch that must see the same step noise, such as the KL trajectories of every eval prompt."""
    generator: torch.Generator
    rows: int
    times: int


def step_noise(x: torch.Tensor, generator: torch.Generator | ShardedGenerator | TiledGenerator | None) -> torch.Tensor:
    """z ~ N(0, I) for one stochastic step, drawn on the CPU (reproducible) in the latents' dtype/device."""
    if isinstance(generator, TiledGenerator):
        z = torch.randn((generator.rows, *x.shape[1:]), generator=generator.generator, dtype=torch.float32)
        return z.repeat(generator.times, *([1] * (x.dim() - 1))).to(x.device, x.dtype)
    if isinstance(generator, ShardedGenerator):
        z = torch.randn((generator.total, *x.shape[1:]), generator=generator.generator, dtype=torch.float32)
        return z[generator.rows].to(x.device, x.dtype)
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) tensor shaped to broadcast against (B, ...) ``like``, on its device."""
    v = v.to(like.device)
    return v.view(-1, *([1] * (like.dim() - 1))) if v.dim() == 1 else v


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std, reduction: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample (std a number or one per sample), reduced over non-batch elements."""
    if reduction not in LOGPROB_REDUCTIONS:
        raise ValueError(f"log-prob reduction {reduction!r}: accepted {LOGPROB_REDUCTIONS}")
    dt = torch.promote_types(torch.promote_types(x.dtype, mean.dtype), torch.float32)  # float32 at least
    x, mean = x.to(dt), mean.to(dt)
    std = per_sample(torch.as_tensor(std, dtype=torch.float64), x).to(dt)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) per sample = ||mean_p - mean_q||^2 / (2 std^2),
    reduced over non-batch elements like the log-prob (``sum`` = the true KL in nats)."""
    dt = torch.promote_types(torch.promote_types(mean_p.dtype, mean_q.dtype), torch.float32)  # float32 at least
    mean_p, mean_q = mean_p.to(dt), mean_q.to(dt)
    std = per_sample(torch.as_tensor(std, dtype=torch.float64), mean_p).to(dt)
    kl = ((mean_p - mean_q) ** 2 / (2 * std ** 2)).flatten(1)
    return kl.mean(1) if reduction == "mean" else kl.sum(1)


@dataclasses.dataclass
class StepOut:
    prev: torch.Tensor         # x_{t-1}
    mean: torch.Tensor         # its Gaussian mean
    std: torch.Tensor          # sigma_t, per sample (B,) or a scalar tensor
    log_prob: torch.Tensor | None  # log p(prev | x_t); None where sigma_t = 0


def ddim_step(scheduler, model_output: torch.Tensor, t, x_t: torch.Tensor, num_steps: int, eta: float = 0.0,
              noise: torch.Tensor | None = None, prev: torch.Tensor | None = None,
              reduction: str = "mean") -> StepOut:
    """One DDIM step t -> t_prev; ``t`` an int or one timestep per sample (B,).  ``prev`` given = score that
    sample (its log-prob) instead of drawing one; ``noise`` = z of eq. (12) (None: the mean, eta's noise off)."""
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False):
        raise ValueError("DDIM with dynamic thresholding is not supported")
    # 1. the cumulative alphas at t and at the previous timestep
    a_t, a_prev = alphas(scheduler, t, num_steps)
    # the step's arithmetic in float32 at least, whatever the model's dtype: a half-precision mean moves a log-prob
    # by one unit in its last place (5.6e-4 in fp16, 4.5e-3 in bf16 at a log-prob of -0.58), 5-45x DDPO's clip range
    latent_dtype = x_t.dtype
    dt = torch.promote_types(x_t.dtype, torch.float32)
    x_t, model_output = x_t.to(dt), model_output.to(dt)

    def c(v):  # a float64 coefficient, per sample or scalar, in the latents' dtype and shape
        return per_sample(v, x_t).to(dt)

    # 2. predicted x0 ("f_theta", eq. 9) and epsilon, from the model output
    if cfg.prediction_type == "epsilon":
        x0 = (x_t - c((1 - a_t).sqrt()) * model_output) / c(a_t.sqrt())
        eps = model_output
    elif cfg.prediction_type == "v_prediction":
        x0 = c(a_t.sqrt()) * x_t - c((1 - a_t).sqrt()) * model_output
        eps = c(a_t.sqrt()) * model_output + c((1 - a_t).sqrt()) * x_t
    elif cfg.prediction_type == "sample":
        x0 = model_output
        eps = (x_t - c(a_t.sqrt()) * x0) / c((1 - a_t).sqrt())
    else:
        raise ValueError(f"prediction_type {cfg.prediction_type!r} is not supported")
    # 3. clip the predicted x0 (diffusers' clip_sample)
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    # 4. sigma_t(eta), eq. (16)
    std = sigma(a_t, a_prev, eta)
    # 5. the mean of x_{t-1}: eq. (12) without its noise term
    mean = c(a_prev.sqrt()) * x0 + c((1 - a_prev - std ** 2).clamp(min=0).sqrt()) * eps
    # 6. x_{t-1} = mean + sigma_t z (or the given sample), and its log-density under N(mean, sigma_t^2 I)
    #    (the sample taken is the one in the latents' dtype, the next UNet call's input; its log-density in float32)
    if prev is None:
        prev = mean if noise is None or bool((std == 0).all()) else mean + c(std) * noise.to(dt)
        prev = prev.to(latent_dtype)
    log_prob = gaussian_log_prob(prev.detach().to(dt), mean, std, reduction) if bool((std > 0).all()) else None
    return StepOut(prev=prev, mean=mean, std=std, log_prob=log_prob)


# ---- the forward process q(x_t | x_0) and the training target (DDPM, Ho et al. 2020, eq. 4) ----------------

def add_noise(scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps for one training timestep per sample (coefficients in float64)."""
    a_t = scheduler.alphas_cumprod.double()[torch.as_tensor(t).long().cpu()]
    return per_sample(a_t.sqrt(), x0).to(x0.dtype) * x0 + per_sample((1 - a_t).sqrt(), x0).to(x0.dtype) * noise


def training_target(scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to output at x_t: eps (epsilon prediction) or v = sqrt(a) eps - sqrt(1 - a) x_0."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a_t = scheduler.alphas_cumprod.double()[torch.as_tensor(t).long().cpu()]
        return per_sample(a_t.sqrt(), x0).to(x0.dtype) * noise - per_sample((1 - a_t).sqrt(), x0).to(x0.dtype) * x0
    raise ValueError(f"prediction_type {kind!r} is not supported for training; accepted: epsilon, v_prediction")


# ---- the one-step projection x_t -> x_{t'} (DDIM, eta = 0, any t' <= t; OGDM's projection) ----------------

def x0_and_eps(scheduler, model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """The model's x0 prediction (eq. 9, unclipped) and epsilon at training timesteps ``t`` (one per sample)."""
    a_t = per_sample(scheduler.alphas_cumprod.double()[torch.as_tensor(t).long().cpu()], x_t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return (x_t - (1 - a_t).sqrt().to(x_t.dtype) * model_output) / a_t.sqrt().to(x_t.dtype), model_output
    if kind == "v_prediction":
        x0 = a_t.sqrt().to(x_t.dtype) * x_t - (1 - a_t).sqrt().to(x_t.dtype) * model_output
        return x0, a_t.sqrt().to(x_t.dtype) * model_output + (1 - a_t).sqrt().to(x_t.dtype) * x_t
    raise ValueError(f"prediction_type {kind!r} is not supported; accepted: epsilon, v_prediction")


def project(scheduler, x0: torch.Tensor, eps: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
    """The deterministic DDIM jump to training timesteps ``t_to`` (one per sample), eq. (12) with sigma = 0:
    x_{t'} = sqrt(a_{t'}) x0 + sqrt(1 - a_{t'}) eps.  With the model's (x0_hat, eps_hat) at x_t this is the
    model's one-step projection; with the true (x_0, eps) that made x_t it is exactly q(x_{t'} | x_0) with the same
    noise, ``add_noise(x_0, t', eps)``."""
    a = per_sample(scheduler.alphas_cumprod.double()[torch.as_tensor(t_to).long().cpu()], x0)
    return a.sqrt().to(x0.dtype) * x0 + (1 - a).sqrt().to(x0.dtype) * eps


def noise_of(scheduler, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise that takes x_0 to x_t at training timesteps ``t``: (x_t - sqrt(a_t) x_0) / sqrt(1 - a_t) (float64
    inside)."""
    a = per_sample(scheduler.alphas_cumprod.double()[torch.as_tensor(t).long().cpu()], x_t)
    return ((x_t.double() - a.sqrt() * x0.double()) / (1 - a).sqrt()).to(x_t.dtype)
