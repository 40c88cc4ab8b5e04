"""The noising process a model was trained with, behind one set of functions: DDPM / DDIM or rectified flow.

Every sampler, method and helper of the suite calls these functions with the pipeline's scheduler, never the
process's own module, so the same method file runs on both kinds of model.  The scheduler the model folder ships
decides which process it is:

- a DDPM-family scheduler (``DDIMScheduler``, the tiny world, Stable Diffusion 1.x, SDXL): ``diffalign.ddim``
  (Song, Meng, Ermon, arXiv 2010.02502; the forward process of Ho, Jain, Abbeel, arXiv 2006.11239);
- ``FlowMatchEulerDiscreteScheduler`` (the tiny flow world, SD3, FLUX): ``diffalign.flow`` (rectified flow: Liu et al.,
  arXiv 2209.03003; Esser et al., arXiv 2403.03206; the SDE of Flow-GRPO, Liu et al., arXiv 2505.05470).

One timestep convention serves both: ``t`` is what the model is given as its time input.  For DDPM it is the integer
training timestep (0 .. T-1); for a flow it is 1000 s, s in [0, 1] the interpolation time of x_s = (1 - s) x_0 + s eps
(what diffusers' flow scheduler hands the model), so a training timestep drawn as an integer 0 .. T-1 means
s = t / T there.  ``eta`` is the sampler's stochasticity: DDIM's eta (eq. 16), or on a flow Flow-GRPO's noise level
``a`` (eta = 0: the deterministic ODE / DDIM sampler on either kind).

How each function reads on a flow (the DDPM meaning is in ``diffalign.ddim``):

    add_noise(x0, t, eps)        x_s = (1 - s) x0 + s eps
    training_target(x0, t, eps)  v = eps - x0                       (the velocity the model predicts)
    x0_and_eps(v, t, x_s)        x0 = x_s - s v,  eps = x_s + (1 - s) v
    project(x0, eps, t')         x_s' = (1 - s') x0 + s' eps         (a deterministic jump, OGDM's projection)
    noise_of(x_s, x0, t)         eps = (x_s - (1 - s) x0) / s
    step(v, t, x_s, n, eta)      the Euler ODE step to the next of the n-step schedule's times (eta = 0), or the
                                 Flow-GRPO SDE step with a = eta: N(mean, std^2 I), its log-prob
"""
from __future__ import annotations

import torch

from diffalign import ddim, flow
from diffalign.ddim import (  # noqa: F401  (process-independent: re-exported so callers import one module)
    LOGPROB_REDUCTIONS,
    ShardedGenerator,
    StepOut,
    TiledGenerator,
    gaussian_kl,
    gaussian_log_prob,
    per_sample,
    step_noise,
)

KINDS = ("ddpm", "flow")


def kind(scheduler) -> str:
    """"flow" for a flow-matching scheduler, else "ddpm"."""
    return "flow" if type(scheduler).__name__.startswith("FlowMatch") else "ddpm"


def is_flow(scheduler) -> bool:
    return kind(scheduler) == "flow"


def sampler_variant(scheduler, eta: float) -> str:
    """The exact name of the sampler a run's steps take (recorded in its manifest)."""
    if not is_flow(scheduler):
        return f"ddim (Song et al. 2020, eq. 12; eta={eta:g})"
    return flow.sde_variant(eta) if eta > 0 else flow.ODE_VARIANT


def train_timesteps(scheduler) -> int:
    """T: training timesteps are drawn from 0 .. T-1 (both kinds)."""
    return int(scheduler.config.num_train_timesteps)


def levels(scheduler) -> torch.Tensor:
    """Every training timestep (model time input) of the process, noisiest last: 0 .. T-1 (DDPM), 1 .. T (flow)."""
    T = train_timesteps(scheduler)
    return torch.arange(1, T + 1) if is_flow(scheduler) else torch.arange(T)


def draw_timesteps(scheduler, n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` training timesteps, uniform over the process's T levels (the model's time inputs): 0 .. T-1 for DDPM;
    1 .. T for a flow (s = t / T in (0, 1]: s = 0 would be the clean image, where the noise is not identifiable).
    The same draws from ``generator`` on either kind."""
    t = torch.randint(0, train_timesteps(scheduler), (n,), generator=generator)
    return t + 1 if is_flow(scheduler) else t


def _s(scheduler, t) -> torch.Tensor:
    """A flow's interpolation time s = t / T (float64, CPU), from the model's time input t."""
    return torch.as_tensor(t, dtype=torch.float64).cpu() / train_timesteps(scheduler)


# ---- sampling ----------------------------------------------------------------------------------------------

def _flow_sigmas(scheduler, num_steps: int) -> torch.Tensor:
    """A flow's ``num_steps + 1`` sigmas, with the model's own schedule where its loader gave one (SD3's dynamic
    shift, FLUX's sigmas and shift: ``diffalign.flow_models.schedule_kwargs``)."""
    extra = getattr(scheduler, "schedule_kwargs", None)
    return flow.set_sigmas(scheduler, num_steps, **(extra(num_steps) if extra is not None else {}))


def set_timesteps(scheduler, num_steps: int) -> torch.Tensor:
    """The model's time inputs of the ``num_steps``-step sampler, in sampling order (the first is the noisiest)."""
    if is_flow(scheduler):
        _flow_sigmas(scheduler, num_steps)
        return scheduler.timesteps.clone()
    return ddim.set_timesteps(scheduler, num_steps)


def init_noise_sigma(scheduler) -> float:
    return float(getattr(scheduler, "init_noise_sigma", 1.0))


def _flow_times(scheduler, t, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, s_next) for time inputs ``t`` (a number or one per sample) of the ``num_steps``-step schedule: s_next is
    the schedule's next time after s (0 after the last)."""
    sigmas = _flow_sigmas(scheduler, num_steps)                     # num_steps + 1 values, the terminal 0 last
    times = sigmas[:-1] * train_timesteps(scheduler)
    tt = torch.as_tensor(t, dtype=torch.float64).cpu()
    i = (tt.reshape(-1, 1) - times.reshape(1, -1)).abs().argmin(1)   # the step each t is (exact: t came from times)
    if not torch.allclose(times[i], tt.reshape(-1), rtol=0, atol=1e-3):
        raise ValueError(f"time input {tt.tolist()} is not on the {num_steps}-step flow schedule {times.tolist()}")
    s, s_next = sigmas[i], sigmas[i + 1]
    return (s, s_next) if tt.dim() == 1 else (s[0], s_next[0])


def step(scheduler, model_output: torch.Tensor, t, x_t: torch.Tensor, num_steps: int, eta: float = 0.0,
         noise: torch.Tensor | None = None, prev: torch.Tensor | None = None, reduction: str = "mean") -> StepOut:
    """One sampler step from time input ``t`` to the next of the ``num_steps``-step schedule: ``StepOut`` (the
    sample, its Gaussian mean and std, its log-prob; the log-prob is None where the step is deterministic).
    ``prev`` given: score that sample instead of drawing one; ``noise``: the step's z (None: the mean)."""
    if not is_flow(scheduler):
        return ddim.ddim_step(scheduler, model_output, t, x_t, num_steps, eta, noise=noise, prev=prev,
                              reduction=reduction)
    s, s_next = _flow_times(scheduler, t, num_steps)
    if eta == 0:
        mean = flow.euler_step(x_t, model_output, s, s_next)
        std = torch.zeros_like(s)
        out = mean if prev is None else prev
        return StepOut(prev=out, mean=mean.to(torch.promote_types(mean.dtype, torch.float32)), std=std, log_prob=None)
    if prev is None and noise is None:  # the mean: the step with its noise off (as ddim_step does)
        noise = torch.zeros_like(x_t)
    out = flow.sde_step(x_t, model_output, s, s_next, eta, noise=noise, prev=prev)
    log_prob = flow.step_log_prob(out.prev.detach().to(out.mean.dtype), out.mean, out.std, reduction)
    return StepOut(prev=out.prev, mean=out.mean, std=out.std, log_prob=log_prob)


def step_std(scheduler, t, num_steps: int, eta: float) -> torch.Tensor:
    """The step's standard deviation (float64): DDIM's sigma_t(eta), or the flow SDE's a sqrt(s / (1 - s)) sqrt(-ds)."""
    if not is_flow(scheduler):
        return ddim.step_std(scheduler, t, num_steps, eta)
    s, s_next = _flow_times(scheduler, t, num_steps)
    if eta == 0:
        return torch.zeros_like(s)
    return flow.sde_sigma(s, s_next, eta) * (s - s_next).sqrt()


# ---- the forward process and the training target -------------------------------------------------------------

def add_noise(scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t for training timesteps ``t`` (one per sample)."""
    if not is_flow(scheduler):
        return ddim.add_noise(scheduler, x0, t, noise)
    s = per_sample(_s(scheduler, t), x0)
    return (1 - s).to(x0.dtype) * x0 + s.to(x0.dtype) * noise


def training_target(scheduler, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the model is trained to output at x_t: eps or v (DDPM, by prediction_type), eps - x0 (flow)."""
    if not is_flow(scheduler):
        return ddim.training_target(scheduler, x0, t, noise)
    return noise - x0


def x0_and_eps(scheduler, model_output: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """The model's x0 prediction (unclipped) and noise prediction at training timesteps ``t``."""
    if not is_flow(scheduler):
        return ddim.x0_and_eps(scheduler, model_output, t, x_t)
    s = per_sample(_s(scheduler, t), x_t)
    return x_t - s.to(x_t.dtype) * model_output, x_t + (1 - s).to(x_t.dtype) * model_output


def project(scheduler, x0: torch.Tensor, eps: torch.Tensor, t_to: torch.Tensor) -> torch.Tensor:
    """The deterministic jump to training timesteps ``t_to`` given (x0, eps)."""
    if not is_flow(scheduler):
        return ddim.project(scheduler, x0, eps, t_to)
    s = per_sample(_s(scheduler, t_to), x0)
    return (1 - s).to(x0.dtype) * x0 + s.to(x0.dtype) * eps


def noise_of(scheduler, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise that takes x_0 to x_t at training timesteps ``t`` (float64 inside)."""
    if not is_flow(scheduler):
        return ddim.noise_of(scheduler, x_t, x0, t)
    s = per_sample(_s(scheduler, t), x_t)
    return ((x_t.double() - (1 - s) * x0.double()) / s).to(x_t.dtype)


def clips_x0(scheduler) -> bool:
    """Whether the sampler's step clips its x0 prediction (DDIM's clip_sample; a flow step never does)."""
    return bool(getattr(scheduler.config, "clip_sample", False)) and not is_flow(scheduler)


def eps_error_scale(scheduler, t) -> torch.Tensor:
    """c_t with ||eps_hat - eps||^2 = c_t ||out - target||^2 for the model's output at training timesteps ``t``
    (float64): 1 for an epsilon-predicting DDPM model; a_t for a v-predicting one (eps_hat - eps = sqrt(a_t)
    (v_hat - v)); (1 - s)^2 on a flow, since eps_hat - eps = (1 - s)(v_hat - v) (``x0_and_eps``).  A weight derived on
    the noise error carries to the process's own error through it."""
    if is_flow(scheduler):
        return (1 - _s(scheduler, t)) ** 2
    kind_ = scheduler.config.prediction_type
    if kind_ == "v_prediction":
        return scheduler.alphas_cumprod.double()[torch.as_tensor(t).long().cpu()]
    if kind_ != "epsilon":
        raise ValueError(f"prediction_type {kind_!r}: accepted epsilon, v_prediction (or a flow)")
    return torch.ones(torch.as_tensor(t).shape, dtype=torch.float64)


def log_snr(scheduler, t) -> torch.Tensor:
    """log SNR at training timesteps ``t`` (float64): log(a_t / (1 - a_t)) for DDPM, 2 log((1 - s) / s) for a flow
    (x_s / (1 - s) = x_0 + (s / (1 - s)) eps): the common axis on which a per-timestep weight carries over.
    At s = 1 (pure noise) a flow's is -inf."""
    if is_flow(scheduler):
        s = _s(scheduler, t)
        return 2 * ((1 - s) / s).log()
    a = scheduler.alphas_cumprod.double()[torch.as_tensor(t).long().cpu()]
    return (a / (1 - a)).log()
