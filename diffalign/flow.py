"""Rectified-flow steps: the Euler ODE step, Flow-GRPO's SDE step, and the step's Gaussian log-density.

Convention (diffusers' ``FlowMatchEulerDiscreteScheduler``, SD3, FLUX): x_t = (1 - t) x_0 + t eps, t in [0, 1],
t = 1 is pure noise, the model predicts the velocity v = eps - x_0, and sampling runs from t = 1 down to t = 0.
The scheduler's ``sigmas`` are t (shifted by its ``shift`` / dynamic shifting), its ``timesteps`` are t x 1000.

The SDE is Flow-GRPO's ODE-to-SDE conversion: Liu et al., "Flow-GRPO: Training Flow Matching Models via Online
RL", arXiv 2505.05470.  Notation map (paper -> code):

    t, t + dt (dt < 0)          sigma, sigma_next   (dt = sigma_next - sigma; our "sigma" is diffusers' name for t)
    v_theta(x_t, t)             v                   the model's velocity
    a                           a                   the noise level (0.7 in the paper's configs)
    sigma_t = a sqrt(t/(1-t))   sde_sigma(...)      the diffusion coefficient of the SDE
    x_{t+dt}                    x_prev              the sample taken, N(mean, std^2 I)

Derivation.  Given x_t = x, write x0_hat = E[x_0 | x] and eps_hat = E[eps | x]; then x = (1 - t) x0_hat + t eps_hat
and v(x, t) = eps_hat - x0_hat, so eps_hat = x + (1 - t) v and x0_hat = x - t v.  Given x_0, x_t ~ N((1 - t) x_0,
t^2 I), so (Tweedie) the score is grad log p_t(x) = -E[eps | x] / t = -(x + (1 - t) v) / t.  The ODE dx = v dt has
marginals p_t (continuity equation dp/dt = -div(p v)).  Run backwards in t with a Wiener process W,

    dx = [v - (sigma_t^2 / 2) grad log p_t(x)] dt + sigma_t dW        (dt < 0)

has the same marginals for any sigma_t: in tau = -t its Fokker-Planck equation is
dp/dtau = -div(p (-v + sigma^2/2 grad log p)) + sigma^2/2 lap p = div(p v) = -dp/dt, because p grad log p = grad p.
Substituting the score,  drift = v + sigma_t^2 / (2 t) (x + (1 - t) v).  One Euler-Maruyama step of size dt < 0:

    mean = x (1 + sigma_t^2 dt / (2 t)) + v (1 + sigma_t^2 (1 - t) / (2 t)) dt
    std  = sigma_t sqrt(-dt)
    x_prev = mean + std z,  z ~ N(0, I)

and with sigma_t = a sqrt(t / (1 - t)) the coefficients are 1 + a^2 dt / (2 (1 - t)) and (1 + a^2 / 2) dt,
std = a sqrt(t (-dt) / (1 - t)).  With a = 0 this is the Euler ODE step.

The first step (t = 1).  sigma_t = a sqrt(t / (1 - t)) is infinite at t = 1 (the integral of sigma_t^2 diverges
there, like log(1 - t)), and diffusers' schedules start at t = 1 exactly.  The choice here, named FIRST_STEP, is
Flow-GRPO's public code's guard: at t = 1 the 1 - t under the root is replaced by 1 - t_next, the next point of
the schedule, so the first step has std = a exactly (t = 1, 1 - t_next = -dt) and the mean x (1 - a^2 / 2) + v dt
(the score at t = 1 is -x whatever v, so the mean formula above still holds with this finite sigma).  Measured
consequence (tests/diffalign/test_flow.py, Gaussian data with the exact velocity): such a step has
sigma_t^2 (-dt) = a^2, not small, so its Euler-Maruyama variance is off by a^4 / 4 (+0.06 at a = 0.7) however
many steps the schedule has, and the next steps, where -dt is comparable to 1 - t, add errors of the same kind
(sigma_t^2 (-dt) ~ a^2 / k at the k-th step); the excess decays along the trajectory (at 200 uniform steps it is
+0.006 at t = 0.5 and below 1e-4 at t = 0).  Started below t = 1 (e.g. the ODE down to t = 0.98, the SDE after),
every step keeps the exact marginals within Monte-Carlo error at hundreds of steps.  No other handling of t = 1
alone removes this: it comes from steps with -dt ~ 1 - t near t = 1, not from the guard.

Coefficients are computed in float64 and cast to the step's dtype: the latents' dtype, float32 at least (as in
ddim.py, the mean of a bf16 step is float32; the sample taken is returned in the latents' dtype).  The log-density is
always computed in float32 at least (Flow-GRPO's code notes that bf16 overflows there).  The log-prob is reduced
over latent elements by ``"mean"`` (Flow-GRPO's and ddpo-pytorch's choice) or ``"sum"`` (the true log-density),
``ddim.LOGPROB_REDUCTIONS``; the KL between two such steps (same std) is ``ddim.gaussian_kl``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from diffalign.ddim import (  # noqa: F401  (gaussian_kl and LOGPROB_REDUCTIONS re-exported for flow callers)
    LOGPROB_REDUCTIONS,
    ShardedGenerator,
    TiledGenerator,
    gaussian_kl,
    gaussian_log_prob,
    per_sample,
    step_noise,
)

ODE_VARIANT = "euler-ode (x_prev = x + (t_next - t) v)"
FIRST_STEP = "t=1: sigma_t = a sqrt(t / (1 - t_next)) (Flow-GRPO's guard)"
SDE_VARIANT = "flow-grpo-sde (Euler-Maruyama, sigma_t = a sqrt(t / (1 - t)), " + FIRST_STEP + ", a={a:g})"


def sde_variant(a: float) -> str:
    """The SDE variant's exact name with its noise level, for a run's config."""
    return SDE_VARIANT.format(a=float(a))


def set_sigmas(scheduler, num_steps: int, **kwargs) -> torch.Tensor:
    """A ``FlowMatchEulerDiscreteScheduler``'s ``num_steps + 1`` sigmas (t values, shift applied, the terminal 0
    last) in sampling order, as float64 (exactly the scheduler's float32 values).  The model's timestep input at
    step i is ``scheduler.timesteps[i]`` (= sigmas[i] x num_train_timesteps).  ``kwargs`` go to
    ``set_timesteps`` (``mu`` for dynamic shifting)."""
    scheduler.set_timesteps(num_steps, **kwargs)
    return scheduler.sigmas.clone().double()


def _as64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64).cpu()


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """The Euler ODE step t -> t_next: x + (t_next - t) v, equal to ``FlowMatchEulerDiscreteScheduler.step``.
    ``sigma``/``sigma_next`` numbers or one per sample (B,); arithmetic in float32 at least, result in x's dtype."""
    dt = torch.promote_types(x.dtype, torch.float32)
    h = per_sample(_as64(sigma_next) - _as64(sigma), x).to(dt)
    return (x.to(dt) + h * v.to(dt)).to(x.dtype)


def sde_sigma(sigma, sigma_next, a: float) -> torch.Tensor:
    """sigma_t = a sqrt(t / (1 - t)) in float64, with FIRST_STEP's guard at t = 1 (1 - t -> 1 - t_next)."""
    t, t_next = _as64(sigma), _as64(sigma_next)
    if bool((t_next >= t).any()) or bool((t > 1).any()) or bool((t_next < 0).any()):
        raise ValueError(f"a flow step needs 1 >= t > t_next >= 0; got t={t}, t_next={t_next}")
    one_minus = torch.where(t >= 1, 1 - t_next, 1 - t)
    return a * (t / one_minus).sqrt()


class SDEStep(NamedTuple):
    prev: torch.Tensor   # x_{t_next}, in the latents' dtype
    mean: torch.Tensor   # its Gaussian mean, float32 at least
    std: torch.Tensor    # sigma_t sqrt(-dt), float64, a scalar tensor or one per sample (B,)


def sde_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next, a: float, noise: torch.Tensor | None = None,
             generator: torch.Generator | ShardedGenerator | TiledGenerator | None = None,
             prev: torch.Tensor | None = None) -> SDEStep:
    """One Flow-GRPO SDE step t -> t_next (module docstring): x_prev ~ N(mean, std^2 I).  ``noise`` = the z
    to use; else z is drawn from ``generator`` (``ddim.step_noise``); ``prev`` given = score that sample (no draw),
    as a policy-gradient update recomputes the mean of a stored step.  ``sigma``/``sigma_next`` numbers or (B,)."""
    t, t_next = _as64(sigma), _as64(sigma_next)
    s2 = sde_sigma(t, t_next, a) ** 2
    h = t_next - t                                              # dt < 0
    latent_dtype = x.dtype
    dt = torch.promote_types(x.dtype, torch.float32)
    x32, v32 = x.to(dt), v.to(dt)

    def c(val):  # a float64 coefficient, per sample or scalar, in the step's dtype and shape
        return per_sample(val, x32).to(dt)

    mean = c(1 + s2 * h / (2 * t)) * x32 + c((1 + s2 * (1 - t) / (2 * t)) * h) * v32
    std = s2.sqrt() * (-h).sqrt()
    if prev is None:
        if noise is None:
            noise = step_noise(x, generator)
        prev = (mean + c(std) * noise.to(dt)).to(latent_dtype)
    return SDEStep(prev=prev, mean=mean, std=std)


def step_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, std, reduction: str = "mean") -> torch.Tensor:
    """log N(x_prev; mean, std^2 I) per sample, in float32 at least whatever the inputs' dtype, reduced over the
    non-batch elements by ``reduction`` (LOGPROB_REDUCTIONS).  ``x_prev`` is the sample actually taken (in the
    latents' dtype); pass it detached when differentiating through ``mean``."""
    return gaussian_log_prob(x_prev, mean, std, reduction)

