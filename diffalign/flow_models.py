"""SD3- and FLUX-shaped rectified-flow models behind the suite's denoiser call, their text encoding and sampler.

The models.  Stable Diffusion 3 (Esser et al., "Scaling Rectified Flow Transformers for High-Resolution Image
Synthesis", arXiv 2403.03206): an MMDiT (``diffusers.SD3Transformer2DModel``) on 16-channel VAE latents, conditioned
on three text encoders (CLIP-L, CLIP-G, T5-XXL) and on a pooled text vector.  FLUX.1 (Black Forest Labs' release,
August 2024: FLUX.1 [dev] / [schnell], https://github.com/black-forest-labs/flux and their model cards): an MMDiT with
single-stream blocks (``diffusers.FluxTransformer2DModel``) on 16-channel latents packed into 2x2 patches, with T5 as
the text sequence, CLIP-L's pooled output as the pooled vector, rotary positions from image and text ids, and, for
the guidance-distilled [dev], the guidance scale as an input.  Both are rectified flows (``diffalign.flow``).

What this module gives the suite:

- ``FlowDenoiser``: the transformer with the suite's UNet call, ``forward(sample, timestep, encoder_hidden_states,
  return_dict=False) -> (velocity,)``, so ``diffalign.sampling.guided_eps`` (CFG in one doubled batch) drives it as it
  drives a UNet.  ``sample`` is (B, C, H, W) latents for both models (FLUX's 2x2 packing, img_ids and txt_ids are
  made inside); ``timestep`` is the scheduler's ``timesteps`` entry, t x 1000 (a number, 0-dim or (B,)), passed to
  SD3 as ``StableDiffusion3Pipeline`` passes it and to FLUX divided by 1000 as ``FluxPipeline`` does;
  ``encoder_hidden_states`` carries the pooled vector packed as SDXL's does it (``diffalign.conditioning.pack_pooled``:
  one extra token ``[pooled, 0, ...]`` at the end of the text sequence, which needs the pooled width <= the text
  width: 2048 <= 4096 for SD3, 768 <= 4096 for FLUX.1).  FLUX's guidance input is the attribute ``guidance``
  (FluxPipeline's default 3.5) since the call has no slot for it.
- ``encode_sd3`` / ``encode_flux``: the prompt embeddings the pipelines' ``encode_prompt`` compute; ``FlowModel``
  (``load_flow_model``) holds a loaded folder in the suite's terms (``unet``, ``scheduler``, ``vae``,
  ``encode_prompts``, ``decode``, ``latent_shape``).
- ``flow_sigmas``: the pipelines' schedules (SD3: the scheduler's own, with ``mu`` when it shifts dynamically;
  FLUX: sigmas linspace(1, 1/N, N) and ``mu`` from the image sequence length), through ``diffalign.flow.set_sigmas``.
- ``euler_sample``: the suite-style Euler ODE loop (``diffalign.flow.euler_step``) and the pipelines' VAE decode;
  equal to ``StableDiffusion3Pipeline`` / ``FluxPipeline`` (tests/diffalign/test_flow_models.py).
- ``make_tiny_sd3_folder`` / ``make_tiny_flux_folder``: random-weight tiny versions built from diffusers' and
  transformers' own classes (tokenizers built locally: nothing is downloaded), saved by the pipelines' own
  ``save_pretrained``.

Guidance.  SD3 uses classifier-free guidance: its unconditional input is the encoding of the empty prompt through the
same three encoders (SD3 has no ``force_zeros_for_empty_prompt``), so ``FlowModel.encode_prompts([""] * n)`` is the
negative embedding ``StableDiffusion3Pipeline`` builds when no negative prompt is given.  FLUX.1 runs without CFG:
[dev] is guidance-distilled (the scale is the transformer's ``guidance`` input, one pass per step), [schnell] takes no
guidance at all; ``FluxPipeline``'s optional "true CFG" (``true_cfg_scale`` with a negative prompt) is not reproduced
here.

LoRA.  ``diffalign.lora.add_lora(denoiser, ...)`` works on ``FlowDenoiser`` (it forwards ``add_adapter``,
``disable_adapters``, ``enable_adapters``, ``peft_config`` and ``save_pretrained`` to the transformer).  The suite's
default targets ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` exist in both: in SD3 every joint block's attention; in
FLUX the double-stream blocks' attention (all four) and the single-stream blocks' ``to_q/k/v`` (those have no
``to_out``: their output projection is ``proj_out`` of the block).  The text-stream projections are ``add_q_proj``,
``add_k_proj``, ``add_v_proj`` and ``to_add_out`` in both, if a run wants them too.  The adapter's peft keys start
with ``transformer.`` (the transformer is the adapter's submodule).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import string

import numpy as np
import torch

from diffalign.conditioning import pack_pooled, unpack_pooled
from diffalign.flow import euler_step, set_sigmas

SD3, FLUX = "sd3", "flux"
TRANSFORMER_KINDS = {"SD3Transformer2DModel": SD3, "FluxTransformer2DModel": FLUX}
MAX_SEQUENCE_LENGTH = {SD3: 256, FLUX: 512}  # the pipelines' default T5 lengths (max_sequence_length)
FLUX_GUIDANCE = 3.5           # FluxPipeline's default guidance_scale, the distilled model's guidance input
FLUX_DEFAULT_LATENT_SIZE = 128  # FluxPipeline's default 1024 px / the VAE's 8x
TIMESTEP_SCALE = 1000         # timesteps = t x 1000 (FlowMatchEulerDiscreteScheduler); FLUX's pipeline divides by it
# The resolution-dependent shift's defaults where the scheduler's config lacks them (the pipelines' own defaults;
# note SD3's max_shift default is 1.16, FLUX's 1.15).
SHIFT_DEFAULTS = {SD3: dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.16),
                  FLUX: dict(base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)}


# ---------------------------------------------------------------------------------------------------------------------
# The denoiser adapter


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    """FLUX's token layout: (B, C, H, W) latents -> (B, (H/2)(W/2), 4C), one token per 2x2 patch (row-major patches,
    each token's features channel-major, then the patch's row, then its column)."""
    b, c, h, w = x.shape
    patches = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack_latents``: (B, (H/2)(W/2), 4C) -> (B, C, H, W)."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


def flux_image_ids(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary position ids of the packed image tokens: (H/2 x W/2, 3) rows (0, patch row, patch column)."""
    rows = torch.arange(height // 2).repeat_interleave(width // 2)
    cols = torch.arange(width // 2).repeat(height // 2)
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=1)
    return ids.to(device=like.device, dtype=like.dtype)


def _batch_timesteps(timestep, sample: torch.Tensor) -> torch.Tensor:
    """A number, 0-dim or one-element tensor expanded to the batch (the pipelines' ``t.expand(B)``), or (B,) as is."""
    t = torch.as_tensor(timestep, device=sample.device)
    if not t.is_floating_point():
        t = t.float()
    return t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t


class FlowDenoiser(torch.nn.Module):
    """An SD3 or FLUX transformer behind the suite's UNet call (module docstring): ``forward(sample, timestep,
    encoder_hidden_states, return_dict=False) -> (velocity,)``, velocity in ``sample``'s (B, C, H, W) layout.

    ``config`` is in the UNet's terms the suite reads: ``in_channels`` / ``out_channels`` (latent channels: 16 for
    both; FLUX's transformer sees 4x that, packed), ``sample_size`` (the latent side: SD3's transformer config, FLUX's
    pipeline default 128 unless given), ``cross_attention_dim`` (the packed conditioning's width, the transformer's
    ``joint_attention_dim``), plus ``kind``, ``pooled_projection_dim`` and ``guidance_embeds``; the transformer's own
    config is ``denoiser.transformer.config``."""

    def __init__(self, transformer: torch.nn.Module, sample_size: int | None = None, guidance: float | None = None):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict  # lazy: heavy package

        kind = TRANSFORMER_KINDS.get(type(transformer).__name__)
        if kind is None:
            raise ValueError(f"FlowDenoiser wraps {' or '.join(TRANSFORMER_KINDS)}, not {type(transformer).__name__}")
        c = transformer.config
        if c.pooled_projection_dim > c.joint_attention_dim:
            raise ValueError(f"the pooled width ({c.pooled_projection_dim}) does not fit one token of the text width "
                             f"({c.joint_attention_dim}): pack_pooled cannot carry it")
        self.transformer = transformer
        self.kind = kind
        packing = 4 if kind == FLUX else 1
        guided = bool(c.get("guidance_embeds", False))
        self.guidance = (FLUX_GUIDANCE if guidance is None else float(guidance)) if guided else None
        self.config = FrozenDict(
            kind=kind, in_channels=c.in_channels // packing, out_channels=(c.out_channels or c.in_channels) // packing,
            sample_size=int(sample_size or c.get("sample_size") or FLUX_DEFAULT_LATENT_SIZE),
            cross_attention_dim=c.joint_attention_dim, pooled_projection_dim=c.pooled_projection_dim,
            guidance_embeds=guided)

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor, return_dict: bool = False):
        hidden, pooled = unpack_pooled(encoder_hidden_states, self.config.pooled_projection_dim)
        t = _batch_timesteps(timestep, sample)
        if self.kind == SD3:
            v = self.transformer(hidden_states=sample, timestep=t, encoder_hidden_states=hidden,
                                 pooled_projections=pooled, return_dict=False)[0]
        else:
            v = self._flux_velocity(sample, t, hidden, pooled)
        if return_dict:
            from diffusers.models.modeling_outputs import Transformer2DModelOutput  # lazy: heavy package

            return Transformer2DModelOutput(sample=v)
        return (v,)

    def _flux_velocity(self, sample, t, hidden, pooled) -> torch.Tensor:
        """FluxPipeline's transformer call on (B, C, H, W) latents: packed tokens, t / 1000 in the latents' dtype,
        the guidance input for a distilled model, zero text ids and the patches' (0, row, column) image ids."""
        _, _, h, w = sample.shape
        guidance = None
        if self.config.guidance_embeds:
            if self.guidance is None:
                raise ValueError("a guidance-distilled FLUX transformer needs FlowDenoiser.guidance")
            guidance = torch.full((sample.shape[0],), self.guidance, dtype=torch.float32, device=sample.device)
        out = self.transformer(hidden_states=pack_latents(sample), timestep=t.to(sample.dtype) / TIMESTEP_SCALE,
                               guidance=guidance, pooled_projections=pooled, encoder_hidden_states=hidden,
                               txt_ids=hidden.new_zeros(hidden.shape[1], 3), img_ids=flux_image_ids(h, w, sample),
                               return_dict=False)[0]
        return unpack_latents(out, h, w)

    # the peft / diffusers adapter API that diffalign.lora uses, on the wrapped transformer
    def add_adapter(self, adapter_config, adapter_name: str = "default") -> None:
        self.transformer.add_adapter(adapter_config, adapter_name=adapter_name)

    def disable_adapters(self) -> None:
        self.transformer.disable_adapters()

    def enable_adapters(self) -> None:
        self.transformer.enable_adapters()

    def set_adapter(self, adapter_name) -> None:
        self.transformer.set_adapter(adapter_name)

    @property
    def peft_config(self) -> dict:
        return self.transformer.peft_config

    def save_pretrained(self, path: str, **kwargs) -> None:
        self.transformer.save_pretrained(path, **kwargs)


@contextlib.contextmanager
def guidance_input(denoiser: FlowDenoiser, guidance: float | None):
    """FLUX [dev]'s guidance input set to ``guidance`` for the duration (no effect on a model without one)."""
    before = denoiser.guidance
    if denoiser.config.guidance_embeds and guidance is not None:
        denoiser.guidance = float(guidance)
    try:
        yield denoiser
    finally:
        denoiser.guidance = before


# ---------------------------------------------------------------------------------------------------------------------
# Text encoding (StableDiffusion3Pipeline.encode_prompt / FluxPipeline.encode_prompt, one image per prompt)


def _token_ids(tokenizer, prompts: list[str], max_length: int, device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def encode_sd3(prompts: list[str], tokenizers, text_encoders, max_sequence_length: int = MAX_SEQUENCE_LENGTH[SD3],
               joint_attention_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SD3's conditioning: (text sequence (B, 2 x 77 -> L_clip + max_sequence_length, D), pooled (B, P)).

    ``tokenizers`` / ``text_encoders``: (CLIP-L, CLIP-G, T5), both CLIPs ``CLIPTextModelWithProjection``.  Each CLIP
    runs on max-length padded ids (the first tokenizer's ``model_max_length`` for both, as the pipeline does); their
    penultimate hidden states are concatenated along the features and zero-padded to T5's width D, T5's last hidden
    states (``max_sequence_length`` tokens) are appended along the sequence; pooled = the two CLIPs' projected pooled
    outputs concatenated.  A folder without T5 (``text_encoders[2] is None``) gets zeros there, of width
    ``joint_attention_dim``, as the pipeline does."""
    clip_len = tokenizers[0].model_max_length
    dtype = text_encoders[0].dtype
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], text_encoders[:2]):
        out = encoder(_token_ids(tokenizer, prompts, clip_len, encoder.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2].to(dtype))
        pooled.append(out[0])
    clip = torch.cat(hidden, dim=-1)
    if text_encoders[2] is None:
        t5 = torch.zeros(len(prompts), max_sequence_length, joint_attention_dim, dtype=dtype, device=clip.device)
    else:
        ids = _token_ids(tokenizers[2], prompts, max_sequence_length, text_encoders[2].device)
        t5 = text_encoders[2](ids)[0].to(text_encoders[2].dtype)
    clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def encode_flux(prompts: list[str], tokenizers, text_encoders,
                max_sequence_length: int = MAX_SEQUENCE_LENGTH[FLUX]) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX.1's conditioning: (T5's last hidden states (B, max_sequence_length, D), CLIP-L's pooled output (B, P)).

    ``tokenizers`` / ``text_encoders``: (CLIP-L as ``CLIPTextModel``, T5).  CLIP's ids are max-length padded to its
    tokenizer's ``model_max_length``; its ``pooler_output`` (the hidden state at the end-of-text token, unprojected)
    is the pooled vector; T5 is padded to ``max_sequence_length``."""
    clip_tok, t5_tok = tokenizers
    clip, t5 = text_encoders
    pooled = clip(_token_ids(clip_tok, prompts, clip_tok.model_max_length, clip.device),
                  output_hidden_states=False).pooler_output.to(clip.dtype)
    hidden = t5(_token_ids(t5_tok, prompts, max_sequence_length, t5.device), output_hidden_states=False)[0]
    return hidden.to(t5.dtype), pooled


# ---------------------------------------------------------------------------------------------------------------------
# A loaded folder in the suite's terms


@dataclasses.dataclass
class FlowModel:
    """An SD3- or FLUX-shaped folder as the suite sees a model: ``unet`` (the ``FlowDenoiser``), ``scheduler`` (the
    folder's ``FlowMatchEulerDiscreteScheduler``), ``vae``, the text encoders and tokenizers in the pipeline's order
    (SD3: CLIP-L, CLIP-G, T5; FLUX: CLIP-L, T5) and the T5 length the pipeline would use."""
    unet: FlowDenoiser
    scheduler: object
    vae: torch.nn.Module
    text_encoders: tuple
    tokenizers: tuple
    max_sequence_length: int
    path: str | None = None

    @property
    def kind(self) -> str:
        return self.unet.kind

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def text_dim(self) -> int:
        return self.unet.config.cross_attention_dim

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """The pipeline's prompt embeddings with the pooled vector packed as one extra token (``pack_pooled``):
        (B, L + 1, D).  ``[""] * n`` gives SD3's unconditional (empty negative prompt) input."""
        if self.kind == SD3:
            hidden, pooled = encode_sd3(prompts, self.tokenizers, self.text_encoders, self.max_sequence_length,
                                        self.unet.config.cross_attention_dim)
        else:
            hidden, pooled = encode_flux(prompts, self.tokenizers, self.text_encoders, self.max_sequence_length)
        return pack_pooled(hidden, pooled).to(self.dtype)

    def to(self, device=None, dtype=None) -> "FlowModel":
        for m in (self.unet, self.vae, *self.text_encoders):
            if m is not None:
                m.to(device=device, dtype=dtype)
        return self

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) latents -> images in [0, 1], as both pipelines decode: latents / scaling_factor +
        shift_factor through the VAE, then (x + 1) / 2 clamped.  Differentiable."""
        c = self.vae.config
        x = self.vae.decode(latents / c.scaling_factor + (c.shift_factor or 0.0), return_dict=False)[0]
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return (x / 2 + 0.5).clamp(0, 1)


def _components_model(components: dict, path: str | None, sample_size: int | None,
                      max_sequence_length: int | None) -> FlowModel:
    denoiser = FlowDenoiser(components["transformer"], sample_size=sample_size)
    names = ("text_encoder", "text_encoder_2", "text_encoder_3") if denoiser.kind == SD3 else \
        ("text_encoder", "text_encoder_2")
    return FlowModel(unet=denoiser, scheduler=components["scheduler"], vae=components["vae"],
                     text_encoders=tuple(components.get(n) for n in names),
                     tokenizers=tuple(components.get(n.replace("text_encoder", "tokenizer")) for n in names),
                     max_sequence_length=max_sequence_length or MAX_SEQUENCE_LENGTH[denoiser.kind], path=path)


def load_flow_model(source, sample_size: int | None = None, max_sequence_length: int | None = None,
                    device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> FlowModel:
    """A ``FlowModel`` from a diffusers folder (``StableDiffusion3Pipeline`` / ``FluxPipeline`` layout), a loaded
    pipeline, or its ``components`` dict; every module frozen and in eval mode (shared with a pipeline given, not
    copied).  ``sample_size``: the latent side for FLUX (its transformer does not record one)."""
    path = None
    if isinstance(source, (str, os.PathLike)):
        from diffusers import DiffusionPipeline  # lazy: heavy package

        path = str(source)
        source = DiffusionPipeline.from_pretrained(path)
    components = source if isinstance(source, dict) else source.components
    vae = components["vae"]
    if sample_size is None and vae is not None and vae.config.get("sample_size"):  # the VAE's image side / its factor
        sample_size = int(vae.config.sample_size) // 2 ** (len(vae.config.block_out_channels) - 1)
    model = _components_model(components, path, sample_size, max_sequence_length)
    model.scheduler.schedule_kwargs = functools.partial(schedule_kwargs, model)  # the suite's samplers read it
    for m in (model.unet, model.vae, *model.text_encoders):
        if m is not None:
            m.requires_grad_(False).eval()
            if device is not None or dtype is not None:
                m.to(device=device, dtype=dtype)
    return model


def as_flow_model(source, **kwargs) -> FlowModel:
    return source if isinstance(source, FlowModel) else load_flow_model(source, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Schedules and the Euler sampler


def resolution_shift(image_seq_len: int, base_image_seq_len: int, max_image_seq_len: int, base_shift: float,
                     max_shift: float) -> float:
    """The resolution-dependent time shift ``mu`` (the shifted schedules of the SD3 paper, with the size rule the
    pipelines use, from FLUX.1): linear in the number of image tokens, ``base_shift`` at ``base_image_seq_len`` and
    ``max_shift`` at ``max_image_seq_len`` (slope, then intercept, as the pipelines evaluate it, so the float64 value
    is the same)."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_image_seq_len)


def _shift_mu(scheduler, kind: str, image_seq_len: int) -> float:
    c = scheduler.config
    return resolution_shift(image_seq_len, *(c.get(k, v) for k, v in SHIFT_DEFAULTS[kind].items()))


def schedule_kwargs(model: FlowModel, num_steps: int, height: int | None = None, width: int | None = None) -> dict:
    """What ``set_timesteps`` needs besides the number of steps for the pipeline's schedule at (height, width) latents
    (default: the model's latent size): nothing (SD3, static shift), ``mu`` (SD3, dynamic shift), or ``sigmas`` and
    ``mu`` (FLUX).  ``load_flow_model`` hands it to the scheduler as ``schedule_kwargs(num_steps)``, which
    ``diffalign.process`` calls, so the suite's samplers run the pipeline's schedule."""
    height = height or model.unet.config.sample_size
    width = width or model.unet.config.sample_size
    scheduler = model.scheduler
    if model.kind == SD3:
        if not scheduler.config.get("use_dynamic_shifting", False):
            return {}
        patch = model.unet.transformer.config.patch_size
        return {"mu": _shift_mu(scheduler, SD3, (height // patch) * (width // patch))}
    sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
    return {"sigmas": sigmas, "mu": _shift_mu(scheduler, FLUX, (height // 2) * (width // 2))}


def flow_sigmas(model: FlowModel, num_steps: int, height: int, width: int) -> torch.Tensor:
    """The ``num_steps + 1`` sigmas (float64, terminal 0 last; ``model.scheduler.timesteps`` set alongside) of the
    pipeline's schedule for (height, width) latents.  SD3: the scheduler's own schedule (its ``shift``), with ``mu``
    from the transformer's patch count when it shifts dynamically.  FLUX: sigmas linspace(1, 1/N, N) (unless the
    scheduler uses ``use_flow_sigmas``) and ``mu`` from the packed image's token count, always passed."""
    return set_sigmas(model.scheduler, num_steps, **schedule_kwargs(model, num_steps, height, width))


@torch.no_grad()
def euler_sample(source, prompts: list[str], latents: torch.Tensor, num_steps: int, guidance: float,
                 max_sequence_length: int | None = None, return_latents: bool = False):
    """Sample with the Euler ODE from ``latents`` (B, C, H, W) (pure noise at t = 1) and decode: images (B, 3, H', W')
    in [0, 1] (and the final latents with ``return_latents``).

    ``source``: a ``FlowModel``, a folder, a pipeline or its components.  ``guidance``: SD3's CFG scale (one doubled
    batch through ``diffalign.sampling.guided_eps`` when > 1, as the pipeline's ``guidance_scale > 1``); FLUX's
    guidance input (no CFG).  Equal to ``StableDiffusion3Pipeline`` / ``FluxPipeline`` with the same latents, steps,
    guidance_scale and max_sequence_length."""
    from diffalign.sampling import guided_eps  # lazy: the samplers may import this module

    model = as_flow_model(source)
    if max_sequence_length is not None:
        model = dataclasses.replace(model, max_sequence_length=max_sequence_length)
    prompts = list(prompts)
    cond = model.encode_prompts(prompts)
    cfg = guidance if model.kind == SD3 and guidance > 1 else 1.0
    uncond = model.encode_prompts([""] * len(prompts)) if cfg != 1.0 else None
    sigmas = flow_sigmas(model, num_steps, latents.shape[-2], latents.shape[-1])
    timesteps = model.scheduler.timesteps
    x = latents.to(model.device, model.dtype)
    with guidance_input(model.unet, guidance if model.kind == FLUX else None):
        for i in range(num_steps):
            v = guided_eps(model.unet, x, timesteps[i], cond, uncond, cfg)
            x = euler_step(x, v, sigmas[i], sigmas[i + 1])
    images = model.decode(x)
    return (images, x) if return_latents else images


# ---------------------------------------------------------------------------------------------------------------------
# Tiny random-weight folders (nothing downloaded)

TINY_LATENT_SIZE = 8       # 8 x 8 latents, 16 x 16 images (a 2-level VAE)
TINY_CLIP_LENGTH = 16      # the tiny CLIPs' model_max_length (77 in the real ones)
LATENT_CHANNELS = 16       # SD3's and FLUX.1's VAEs
# The released VAEs' latent normalisation (their vae/config.json) and the schedulers' shift settings.
SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)
_CHARS = string.ascii_lowercase + string.digits


def _tiny_words() -> list[str]:
    from diffalign import world

    return [w for w in world.VOCAB if w.isalpha() and w.islower()]


def tiny_clip_tokenizer(max_length: int = TINY_CLIP_LENGTH):
    """A real ``CLIPTokenizer`` (byte-level BPE, lower-casing, start/end-of-text tokens) over a tiny vocabulary: every
    letter and digit (so any prompt tokenizes without unknowns) plus merges for the tiny world's words, each word's
    chained left to right (most words become one token; where an earlier word's merge ranks first, a few pieces)."""
    from transformers import CLIPTokenizer  # lazy: heavy package

    vocab = ["<|startoftext|>", "<|endoftext|>"] + list(_CHARS) + [ch + "</w>" for ch in _CHARS]
    merges = []
    for word in _tiny_words():
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pair, merged = (parts[0], parts[1]), parts[0] + parts[1]
            if pair not in merges:
                merges.append(pair)
            if merged not in vocab:
                vocab.append(merged)
            parts = [merged] + parts[2:]
    return CLIPTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges, model_max_length=max_length)


def tiny_t5_tokenizer():
    """A real ``T5TokenizerFast`` (SentencePiece-style unigram, "▁" word starts, ``</s>`` appended) over the tiny
    world's words (likelier than their letters) and every letter and digit; ids <pad> 0, </s> 1, <unk> 2."""
    from transformers import T5TokenizerFast  # lazy: heavy package

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -1.0) for w in _tiny_words()]
    pieces += [(ch, -3.0) for ch in _CHARS] + [("▁" + ch, -3.0) for ch in _CHARS]
    return T5TokenizerFast(vocab=pieces, extra_ids=0)


def _tiny_clip(cls, tokenizer, width: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig  # lazy: heavy package

    extra = {} if projection_dim is None else {"projection_dim": projection_dim}
    return cls(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                              num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=TINY_CLIP_LENGTH,
                              bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id, **extra))


def _tiny_t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel  # lazy: heavy package

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=1,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def _tiny_vae(factors: dict):
    from diffusers import AutoencoderKL  # lazy: heavy package

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=2 * TINY_LATENT_SIZE,
                         use_quant_conv=False, use_post_quant_conv=False, **factors)


def make_tiny_sd3_folder(path, seed: int = 0) -> str:
    """A random-weight SD3-shaped folder written by ``StableDiffusion3Pipeline.save_pretrained``: a 2-block MMDiT
    (4 heads of 8, patch 2, 8 x 8 x 16 latents), CLIP-L and CLIP-G (width 32, projections 32 + 32 = the pooled 64),
    T5 (width 80: the CLIPs' 64 are zero-padded to it), a 16-channel VAE with SD3's latent factors, and SD3's
    scheduler (shift 3).  Global RNG untouched."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizers = [tiny_clip_tokenizer(), tiny_clip_tokenizer(), tiny_t5_tokenizer()]
        transformer = SD3Transformer2DModel(
            sample_size=TINY_LATENT_SIZE, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            num_layers=2, attention_head_dim=8, num_attention_heads=4, joint_attention_dim=80,
            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=TINY_LATENT_SIZE)
        pipe = StableDiffusion3Pipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER), vae=_tiny_vae(SD3_VAE),
            text_encoder=_tiny_clip(CLIPTextModelWithProjection, tokenizers[0], 32, 32), tokenizer=tokenizers[0],
            text_encoder_2=_tiny_clip(CLIPTextModelWithProjection, tokenizers[1], 32, 32), tokenizer_2=tokenizers[1],
            text_encoder_3=_tiny_t5(tokenizers[2], 80), tokenizer_3=tokenizers[2])
    pipe.save_pretrained(str(path))
    return str(path)


def make_tiny_flux_folder(path, seed: int = 0) -> str:
    """A random-weight FLUX.1-[dev]-shaped folder written by ``FluxPipeline.save_pretrained``: one double- and one
    single-stream block (2 heads of 16, rotary axes 4 + 6 + 6), guidance embedding (distilled), 16-channel latents
    packed 2x2 (64 input features), CLIP-L (width 32: the pooled 32), T5 (width 48), a 16-channel VAE with FLUX's
    latent factors, and FLUX.1-dev's scheduler (shift 3, dynamic shifting 0.5 -> 1.15).  Global RNG untouched."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip_tok, t5_tok = tiny_clip_tokenizer(), tiny_t5_tokenizer()
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=48, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
        pipe = FluxPipeline(
            transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
            vae=_tiny_vae(FLUX_VAE), text_encoder=_tiny_clip(CLIPTextModel, clip_tok, 32), tokenizer=clip_tok,
            text_encoder_2=_tiny_t5(t5_tok, 48), tokenizer_2=t5_tok)
    pipe.save_pretrained(str(path))
    return str(path)
