"""DDIM sampling with classifier-free guidance: with per-step log-probs, or with gradients.

The DDIM update for the timestep pair t -> t_prev (alpha = cumulative alpha, as in diffusers)::

    x0_hat = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)              (clipped if the scheduler says so)
    sigma  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    mean   = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps
    x_prev = mean + sigma z,   z ~ N(0, I)
    log p(x_prev | x_t) = Gaussian log-density of x_prev (detached) under N(mean, sigma^2 I)

With eta = 0 this is exactly ``DDIMScheduler.step`` (tested against ``StableDiffusionPipeline``).
The log-prob is reduced over latent elements either by ``"mean"`` (what ddpo-pytorch and trl do,
and what a PPO clip range of 1e-4 assumes) or ``"sum"`` (the true log-density); the choice is a
named option recorded in every run's config.

Two samplers share that step:

- ``sample``: no gradients; returns the whole trajectory (latents, timesteps, log-probs), as the
  policy-gradient methods store it, and the decoded images;
- ``sample_with_grad``: keeps the graph through the chain for reward backpropagation, with optional
  gradient checkpointing of every UNet call and a per-step gradient mask from a truncation rule
  (``truncation_mask``).  A masked step runs its UNet without gradient, which is the same as
  detaching its output (the original AlignProp code): gradients still flow through the linear
  x_t -> x_prev path of that step, only the UNet's Jacobian there is dropped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch.utils.checkpoint import checkpoint

from bench.costs import Costs

LOGPROB_REDUCTIONS = ("mean", "sum")


def set_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    scheduler.set_timesteps(num_steps)
    return scheduler.timesteps.clone()


def _alphas(scheduler, t, num_steps: int):
    """Cumulative alphas at t and at the previous timestep, as float64 tensors shaped like t."""
    t = torch.as_tensor(t).long().cpu()
    prev_t = t - scheduler.config.num_train_timesteps // num_steps
    abar = scheduler.alphas_cumprod.double()
    a_t = abar[t]
    a_prev = torch.where(prev_t >= 0, abar[prev_t.clamp(min=0)], torch.as_tensor(scheduler.final_alpha_cumprod).double())
    return a_t, a_prev


def _sigma(a_t: torch.Tensor, a_prev: torch.Tensor, eta: float) -> torch.Tensor:
    return eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()


def step_std(scheduler, t, num_steps: int, eta: float) -> torch.Tensor:
    return _sigma(*_alphas(scheduler, t, num_steps), eta)


def trained_steps(num_steps: int, skip_first: int = 0, skip_last: int = 0) -> torch.Tensor:
    """Indices (sampling order, 0 = the step from pure noise) of the steps a policy gradient trains on:
    all of them unless the first / last few are skipped (their likelihood-ratio terms are the noisiest,
    see the README's "Status of the policy-gradient methods")."""
    return torch.arange(skip_first, num_steps - skip_last)


def step_noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """z ~ N(0, I) for one stochastic step, drawn on the CPU (reproducible) in the latents' dtype/device."""
    return torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)


@contextlib.contextmanager
def base_model(unet):
    """The same UNet with its LoRA adapter switched off: the frozen base model, without a second copy."""
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std, reduction: str = "mean") -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample (std a number or one per sample), reduced over non-batch elements."""
    if reduction not in LOGPROB_REDUCTIONS:
        raise ValueError(f"log-prob reduction {reduction!r}: accepted {LOGPROB_REDUCTIONS}")
    std = _per_sample(torch.as_tensor(std, dtype=torch.float64), x).to(x.dtype)
    lp = -((x - mean) ** 2) / (2 * std ** 2) - std.log() - 0.5 * math.log(2 * math.pi)
    lp = lp.flatten(1)
    return lp.mean(1) if reduction == "mean" else lp.sum(1)


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) tensor shaped to broadcast against (B, ...) ``like``, on its device."""
    v = v.to(like.device)
    return v.view(-1, *([1] * (like.dim() - 1))) if v.dim() == 1 else v


def gaussian_kl(mean_p: torch.Tensor, mean_q: torch.Tensor, std, reduction: str = "mean") -> torch.Tensor:
    """KL(N(mean_p, std^2 I) || N(mean_q, std^2 I)) per sample = ||mean_p - mean_q||^2 / (2 std^2),
    reduced over non-batch elements like the log-prob (``sum`` = the true KL in nats)."""
    std = _per_sample(torch.as_tensor(std, dtype=torch.float64), mean_p).to(mean_p.dtype)
    kl = ((mean_p - mean_q) ** 2 / (2 * std ** 2)).flatten(1)
    return kl.mean(1) if reduction == "mean" else kl.sum(1)


@dataclasses.dataclass
class StepOut:
    prev: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor          # per sample (B,) or a scalar tensor
    log_prob: torch.Tensor | None


def ddim_step(scheduler, model_output: torch.Tensor, t, x_t: torch.Tensor, num_steps: int, eta: float = 0.0,
              noise: torch.Tensor | None = None, prev: torch.Tensor | None = None,
              reduction: str = "mean") -> StepOut:
    """One DDIM step; ``t`` an int or one timestep per sample (B,).  ``prev`` given = score that sample
    (its log-prob) instead of drawing one.  Coefficients are computed in float64, then cast."""
    cfg = scheduler.config
    if getattr(cfg, "thresholding", False):
        raise ValueError("DDIM with dynamic thresholding is not supported")
    a_t, a_prev = _alphas(scheduler, t, num_steps)
    dt = x_t.dtype

    def c(v):  # a float64 coefficient, per sample or scalar, in the latents' dtype and shape
        return _per_sample(v, x_t).to(dt)

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
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    std = _sigma(a_t, a_prev, eta)
    mean = c(a_prev.sqrt()) * x0 + c((1 - a_prev - std ** 2).clamp(min=0).sqrt()) * eps
    if prev is None:
        prev = mean if noise is None or bool((std == 0).all()) else mean + c(std) * noise
    log_prob = gaussian_log_prob(prev.detach(), mean, std, reduction) if bool((std > 0).all()) else None
    return StepOut(prev=prev, mean=mean, std=std, log_prob=log_prob)


def guided_eps(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
               costs: Costs | None = None, with_grad: bool = False) -> torch.Tensor:
    """Classifier-free guided model output: uncond + w (cond - uncond), in one doubled-batch call."""
    if uncond is None or guidance == 1.0:
        inp, emb = x, cond
    else:
        inp, emb = torch.cat([x, x]), torch.cat([uncond, cond])
        if torch.is_tensor(t) and t.dim() == 1:  # one timestep per sample
            t = torch.cat([t, t])
    out = unet(inp, t, encoder_hidden_states=emb, return_dict=False)[0]
    if costs is not None:
        costs.unet_fwd += inp.shape[0]
        costs.unet_bwd += inp.shape[0] if with_grad else 0
    if inp is x:
        return out
    u, c = out.chunk(2)
    return u + guidance * (c - u)


def embed(pipe, prompts: list[str], guidance: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    cond = pipe.encode_prompts(prompts)
    uncond = pipe.encode_prompts([""] * len(prompts)) if guidance != 1.0 else None
    return cond, uncond


def initial_noise(pipe, n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn((n, *pipe.latent_shape), generator=generator, dtype=torch.float32)
    return x.to(pipe.device, pipe.dtype)


@dataclasses.dataclass
class Trajectory:
    latents: torch.Tensor     # (B, T+1, C, H, W): x_T ... x_0
    timesteps: torch.Tensor   # (T,)
    log_probs: torch.Tensor   # (B, T); NaN where eta = 0
    images: torch.Tensor      # (B, 3, H', W') in [0, 1]
    cond: torch.Tensor        # prompt embeddings, kept for recomputation
    uncond: torch.Tensor | None


@torch.no_grad()
def sample(pipe, prompts: list[str], x_T: torch.Tensor, num_steps: int, guidance: float, eta: float,
           generator: torch.Generator | None = None, costs: Costs | None = None,
           reduction: str = "mean") -> Trajectory:
    """Sample without gradients, keeping every latent and each step's log-prob."""
    cond, uncond = embed(pipe, prompts, guidance)
    timesteps = set_timesteps(pipe.scheduler, num_steps)
    x = x_T * pipe.scheduler.init_noise_sigma
    latents, log_probs = [x], []
    for t in timesteps:
        eps = guided_eps(pipe.unet, x, t, cond, uncond, guidance, costs)
        noise = step_noise(x, generator) if eta > 0 else None
        out = ddim_step(pipe.scheduler, eps, int(t), x, num_steps, eta, noise=noise, reduction=reduction)
        x = out.prev
        latents.append(x)
        log_probs.append(out.log_prob if out.log_prob is not None else torch.full((x.shape[0],), float("nan")))
    images = pipe.decode(x)
    if costs is not None:
        costs.images += x.shape[0]
    return Trajectory(torch.stack(latents, 1), timesteps, torch.stack(log_probs, 1).float(), images, cond, uncond)


def sample_with_grad(pipe, prompts: list[str], x_T: torch.Tensor, num_steps: int, guidance: float, eta: float,
                     grad_mask: list[bool] | None = None, checkpointing: bool = True,
                     generator: torch.Generator | None = None, costs: Costs | None = None) -> torch.Tensor:
    """Sample keeping the graph through the chain; returns the decoded images (differentiable).

    ``grad_mask[i]`` says whether step i (0 = first, from pure noise) keeps its UNet's gradient;
    ``None`` = every step (full backprop).  With ``checkpointing`` each UNet call is recomputed in the
    backward pass instead of storing its activations.
    """
    cond, uncond = embed(pipe, prompts, guidance)
    timesteps = set_timesteps(pipe.scheduler, num_steps)
    grad_mask = [True] * len(timesteps) if grad_mask is None else list(grad_mask)
    if len(grad_mask) != len(timesteps):
        raise ValueError(f"grad_mask has {len(grad_mask)} entries for {len(timesteps)} steps")
    x = x_T * pipe.scheduler.init_noise_sigma
    for i, t in enumerate(timesteps):
        if grad_mask[i]:
            if checkpointing:
                eps = checkpoint(guided_eps, pipe.unet, x, t, cond, uncond, guidance, None, use_reentrant=False)
                if costs is not None:
                    n = x.shape[0] * (1 if uncond is None else 2)
                    costs.unet_fwd += n
                    costs.unet_bwd += n
            else:
                eps = guided_eps(pipe.unet, x, t, cond, uncond, guidance, costs, with_grad=True)
        else:
            with torch.no_grad():
                eps = guided_eps(pipe.unet, x.detach(), t, cond, uncond, guidance, costs)
        noise = step_noise(x, generator) if eta > 0 else None
        x = ddim_step(pipe.scheduler, eps, int(t), x, num_steps, eta, noise=noise).prev
    if costs is not None:
        costs.images += x.shape[0]
    return pipe.decode(x)


@torch.no_grad()
def kl_to_base(pipe, prompts: list[str], x_T: torch.Tensor, num_steps: int, guidance: float, eta: float,
               generator: torch.Generator) -> torch.Tensor:
    """Sum over steps of KL(p_theta(x_{t-1}|x_t) || p_base(x_{t-1}|x_t)) along trajectories of the LoRA
    policy (eta > 0), the base being the same UNet with its adapter off; per sample, in nats (element
    sum).  By the chain rule this bounds the KL between the two models' final-image distributions."""
    cond, uncond = embed(pipe, prompts, guidance)
    x = x_T * pipe.scheduler.init_noise_sigma
    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for t in set_timesteps(pipe.scheduler, num_steps):
        out = ddim_step(pipe.scheduler, guided_eps(pipe.unet, x, t, cond, uncond, guidance), int(t), x, num_steps,
                        eta, noise=step_noise(x, generator))
        with base_model(pipe.unet) as base_unet:
            base = ddim_step(pipe.scheduler, guided_eps(base_unet, x, t, cond, uncond, guidance), int(t), x,
                             num_steps, eta)
        if bool((out.std > 0).all()):
            total += gaussian_kl(out.mean, base.mean, out.std, "sum").double().cpu()
        x = out.prev
    return total


TRUNCATIONS = ("full", "per_step", "last_k")
K_DISTS = ("fixed", "uniform", "gaussian")


def truncation_mask(variant: str, num_steps: int, generator: torch.Generator, k: int = 1,
                    k_dist: str = "fixed", k_mean: float | None = None, k_std: float | None = None) -> list[bool]:
    """Which steps keep their UNet gradient, under the named truncation rule.

    - ``full``: every step (full backprop through time; collapsed in the AlignProp paper).
    - ``per_step``: AlignProp v1's code: at every step i (0-based, 0 = pure noise) draw
      u ~ U{0..T} afresh and keep step i iff i >= u, so step i keeps its gradient with probability
      (i+1)/(T+1), rising along the chain (about T/2 steps on average, not contiguous).
    - ``last_k``: the current AlignProp code: one contiguous suffix of K steps, K drawn once per
      sampling call: ``fixed`` (K = k), ``uniform`` (K ~ U{1..T}) or ``gaussian``
      (K = round(N(k_mean, k_std)) clipped to [1, T]; the code's t_bp ~ N(42, 5) on 50 steps is
      K ~ N(8, 5), which ``k_mean``/``k_std`` default to, scaled by T/50).
    """
    if variant == "full":
        return [True] * num_steps
    if variant == "per_step":
        u = torch.randint(0, num_steps + 1, (num_steps,), generator=generator)
        return [i >= int(u[i]) for i in range(num_steps)]
    if variant == "last_k":
        kk = draw_k(num_steps, generator, k, k_dist, k_mean, k_std)
        return [i >= num_steps - kk for i in range(num_steps)]
    raise ValueError(f"truncation {variant!r}: accepted {TRUNCATIONS}")


def draw_k(num_steps: int, generator: torch.Generator, k: int = 1, k_dist: str = "fixed",
           k_mean: float | None = None, k_std: float | None = None) -> int:
    if k_dist == "fixed":
        kk = k
    elif k_dist == "uniform":
        kk = int(torch.randint(1, num_steps + 1, (1,), generator=generator))
    elif k_dist == "gaussian":
        mean = 8.0 * num_steps / 50 if k_mean is None else k_mean
        std = 5.0 * num_steps / 50 if k_std is None else k_std
        kk = round(mean + std * float(torch.randn((), generator=generator)))
    else:
        raise ValueError(f"k_dist {k_dist!r}: accepted {K_DISTS}")
    return max(1, min(num_steps, int(kk)))


@contextlib.contextmanager
def perturbed(params: list[torch.Tensor], direction: list[torch.Tensor], scale: float):
    """The parameters moved to p + scale * u for the duration (zeroth-order estimates), then restored
    exactly (copied back, not subtracted, so no rounding drift is left behind)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, u in zip(params, direction):
            p.add_(u.to(p.device, p.dtype), alpha=scale)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


@torch.no_grad()
def replay_chain(pipe, x: torch.Tensor, noises: list[torch.Tensor | None], cond: torch.Tensor,
                 uncond: torch.Tensor | None, num_steps: int, guidance: float, eta: float, start: int = 0,
                 perturb_steps=(), params: list[torch.Tensor] | None = None,
                 direction: list[torch.Tensor] | None = None, scale: float = 0.0,
                 costs: Costs | None = None) -> list[torch.Tensor]:
    """Run steps ``start..T-1`` from latent ``x`` (the state before step ``start``; 0 = pure noise, already
    scaled) with the given per-step noises, so two calls share their randomness (common random numbers).

    Steps in ``perturb_steps`` run their UNet with ``params`` moved to p + scale * direction (a two-point
    zeroth-order estimate perturbs only some steps).  Returns the latents after each step, x_{start+1}..x_T
    in sampling order, no gradients."""
    timesteps = set_timesteps(pipe.scheduler, num_steps)
    perturb_steps = set(perturb_steps)
    if perturb_steps and (params is None or direction is None):
        raise ValueError("perturb_steps needs params and direction")
    out = []
    for i in range(start, len(timesteps)):
        t = timesteps[i]
        ctx = perturbed(params, direction, scale) if i in perturb_steps else contextlib.nullcontext()
        with ctx:
            eps = guided_eps(pipe.unet, x, t, cond, uncond, guidance, costs)
        x = ddim_step(pipe.scheduler, eps, int(t), x, num_steps, eta, noise=noises[i]).prev
        out.append(x)
    return out
