"""Sampling with classifier-free guidance: with per-step log-probs, or with gradients through the chain.

Every sampler here runs the DDIM step of ``diffalign.ddim`` on the output of ``guided_eps``, the one UNet call
of the suite: it applies classifier-free guidance in one doubled-batch call, optionally checkpoints the call,
and is the only place that counts UNet passes (``Costs.unet_fwd`` / ``unet_bwd``, in images: a CFG call on a
batch of 8 is 16 passes), so the "UNet passes" axis of every curve and the cost table count alike.

- ``sample``: no gradients; returns the whole trajectory (latents, timesteps, log-probs), as the policy-gradient
  methods store it, and the decoded images;
- ``sample_with_grad``: keeps the graph through the chain for reward backpropagation, with optional gradient
  checkpointing of every UNet call and a per-step gradient mask (a method's truncation rule).  A masked step
  runs its UNet without gradient, which is the same as detaching its output (the original AlignProp code):
  gradients still flow through the linear x_t -> x_prev path of that step, only the UNet's Jacobian there is
  dropped;
- ``replay_chain``: re-runs part of a chain with given noises and, at some steps, perturbed parameters
  (zeroth-order estimates);
- ``kl_to_base``: the KL between the LoRA policy and the base model along the policy's trajectories.

With eta = 0, ``sample`` is ``StableDiffusionPipeline`` (``tests/diffalign/test_sampling.py``).
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch.utils.checkpoint import checkpoint

from diffalign import process
from diffalign.costs import Costs
from diffalign.lora import reference
from diffalign.process import gaussian_kl, set_timesteps, step_noise


def _guided(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None,
            guidance: float) -> torch.Tensor:
    inp, emb = (x, cond) if uncond is None or guidance == 1.0 else (torch.cat([x, x]), torch.cat([uncond, cond]))
    if inp is not x and torch.is_tensor(t) and t.dim() == 1:  # one timestep per sample
        t = torch.cat([t, t])
    out = unet(inp, t, encoder_hidden_states=emb, return_dict=False)[0]
    if inp is x:
        return out
    u, c = out.chunk(2)
    return u + guidance * (c - u)


def guided_eps(unet, x: torch.Tensor, t, cond: torch.Tensor, uncond: torch.Tensor | None, guidance: float,
               costs: Costs | None = None, with_grad: bool = False, checkpointing: bool = False) -> torch.Tensor:
    """Classifier-free guided model output uncond + w (cond - uncond), in one doubled-batch UNet call.

    ``costs`` counts the call's passes: forward always, backward when its output stays in the graph
    (``with_grad``, or ``checkpointing``, which also recomputes the call in the backward pass instead of storing
    its activations; the recomputation is not counted again)."""
    if checkpointing:
        out = checkpoint(_guided, unet, x, t, cond, uncond, guidance, use_reentrant=False)
    else:
        out = _guided(unet, x, t, cond, uncond, guidance)
    if costs is not None:
        n = x.shape[0] * (1 if uncond is None or guidance == 1.0 else 2)
        costs.unet_fwd += n
        costs.unet_bwd += n if with_grad or checkpointing else 0
    return out


def base_model(unet):
    """The frozen base model: the same UNet with its LoRA adapter switched off (no second copy), or under full
    fine-tuning the frozen copy taken before training (``diffalign.lora.reference``)."""
    return reference(unet)


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

    def transition(self, idx: torch.Tensor, ti: torch.Tensor):
        """Stored step ``ti[k]`` of sample ``idx[k]``: (x_t, x_prev, t, cond, uncond), the timesteps moved to the
        latents' device (one per sample: diffusers moves only a 0-d timestep)."""
        x_t, x_prev = self.latents[idx, ti], self.latents[idx, ti + 1]
        uncond = self.uncond[idx] if self.uncond is not None else None
        return x_t, x_prev, self.timesteps[ti].to(x_t.device), self.cond[idx], uncond

    @classmethod
    def cat(cls, parts: list["Trajectory"]) -> "Trajectory":
        """Batches of the same sampler (same timesteps) as one batch."""
        return cls(latents=torch.cat([p.latents for p in parts]), timesteps=parts[0].timesteps,
                   log_probs=torch.cat([p.log_probs for p in parts]), images=torch.cat([p.images for p in parts]),
                   cond=torch.cat([p.cond for p in parts]),
                   uncond=torch.cat([p.uncond for p in parts]) if parts[0].uncond is not None else None)


@torch.no_grad()
def sample(pipe, prompts: list[str], x_T: torch.Tensor, num_steps: int, guidance: float, eta: float | list[float],
           generator: torch.Generator | None = None, costs: Costs | None = None,
           reduction: str = "mean", embeddings: tuple | None = None) -> Trajectory:
    """Sample without gradients, keeping every latent and each step's log-prob.  ``eta``: one noise level for every
    step, or one per step (GRPO's windows: the stochastic step, its log-prob stored, where it is > 0; the
    deterministic ODE / DDIM step, no noise drawn and log-prob NaN, where it is 0).  ``embeddings``: the prompts'
    (cond, uncond) text embeddings when the caller already has them (``embed``)."""
    etas = [float(e) for e in eta] if isinstance(eta, (list, tuple)) else [float(eta)] * num_steps
    if len(etas) != num_steps:
        raise ValueError(f"{len(etas)} etas for {num_steps} steps")
    cond, uncond = embeddings if embeddings is not None else embed(pipe, prompts, guidance)
    timesteps = set_timesteps(pipe.scheduler, num_steps)
    x = x_T * process.init_noise_sigma(pipe.scheduler)
    latents, log_probs = [x], []
    for t, eta_t in zip(timesteps, etas):
        eps = guided_eps(pipe.unet, x, t, cond, uncond, guidance, costs)
        noise = step_noise(x, generator) if eta_t > 0 else None
        out = process.step(pipe.scheduler, eps, t, x, num_steps, eta_t, noise=noise, reduction=reduction)
        x = out.prev
        latents.append(x)
        log_probs.append(out.log_prob if out.log_prob is not None
                         else torch.full((x.shape[0],), float("nan"), device=x.device))
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
    x = x_T * process.init_noise_sigma(pipe.scheduler)
    for i, t in enumerate(timesteps):
        if grad_mask[i]:
            eps = guided_eps(pipe.unet, x, t, cond, uncond, guidance, costs, with_grad=True,
                             checkpointing=checkpointing)
        else:
            with torch.no_grad():
                eps = guided_eps(pipe.unet, x.detach(), t, cond, uncond, guidance, costs)
        noise = step_noise(x, generator) if eta > 0 else None
        x = process.step(pipe.scheduler, eps, t, x, num_steps, eta, noise=noise).prev
    if costs is not None:
        costs.images += x.shape[0]
    return pipe.decode(x)


@torch.no_grad()
def kl_to_base(pipe, prompts: list[str], x_T: torch.Tensor, num_steps: int, guidance: float, eta: float,
               generator: torch.Generator, embeddings: tuple | None = None) -> torch.Tensor:
    """Sum over steps of KL(p_theta(x_{t-1}|x_t) || p_base(x_{t-1}|x_t)) along trajectories of the LoRA
    policy (eta > 0), the base being the same UNet with its adapter off; per sample, in nats (element
    sum).  By the chain rule this bounds the KL between the two models' final-image distributions.
    ``embeddings``: the prompts' (cond, uncond) when the caller already has them."""
    cond, uncond = embeddings if embeddings is not None else embed(pipe, prompts, guidance)
    x = x_T * process.init_noise_sigma(pipe.scheduler)
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)  # summed where computed: no sync per step
    for t in set_timesteps(pipe.scheduler, num_steps):
        out = process.step(pipe.scheduler, guided_eps(pipe.unet, x, t, cond, uncond, guidance), t, x, num_steps,
                        eta, noise=step_noise(x, generator))
        with base_model(pipe.unet) as base_unet:
            base = process.step(pipe.scheduler, guided_eps(base_unet, x, t, cond, uncond, guidance), t, x,
                             num_steps, eta)
        if bool((out.std > 0).all()):
            total += gaussian_kl(out.mean, base.mean, out.std, "sum").double()
        x = out.prev
    return total.cpu()


@contextlib.contextmanager
def weights(params: list[torch.Tensor], values: list[torch.Tensor]):
    """The parameters set to ``values`` for the duration, then restored exactly (copied back, not subtracted, so no
    rounding drift is left behind)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def perturbed(params: list[torch.Tensor], direction: list[torch.Tensor], scale: float):
    """The parameters moved to p + scale * u for the duration (zeroth-order estimates), then restored exactly."""
    return weights(params, [torch.add(p.detach(), u.to(p.device, p.dtype), alpha=scale)
                            for p, u in zip(params, direction)])


@torch.no_grad()
def replay_chain(pipe, x: torch.Tensor, noises: list[torch.Tensor | None], cond: torch.Tensor,
                 uncond: torch.Tensor | None, num_steps: int, guidance: float, eta: float, start: int = 0,
                 perturb_steps=(), params: list[torch.Tensor] | None = None,
                 direction: list[torch.Tensor] | None = None, scale: float = 0.0,
                 costs: Costs | None = None, log_probs: list | None = None,
                 reduction: str = "mean") -> list[torch.Tensor]:
    """Run steps ``start..T-1`` from latent ``x`` (the state before step ``start``; 0 = pure noise, already
    scaled) with the given per-step noises, so two calls share their randomness (common random numbers).

    Steps in ``perturb_steps`` run their UNet with ``params`` moved to p + scale * direction (a two-point
    zeroth-order estimate perturbs only some steps).  Returns the latents after each step, x_{start+1}..x_T
    in sampling order, no gradients.  ``log_probs``, a list: each step's log-prob (``reduction``) is appended to it."""
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
        step = process.step(pipe.scheduler, eps, t, x, num_steps, eta, noise=noises[i], reduction=reduction)
        x = step.prev
        out.append(x)
        if log_probs is not None:
            log_probs.append(step.log_prob)
    return out
