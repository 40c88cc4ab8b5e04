"""One loader for diffusers text-to-image folders: the tiny world today, Stable Diffusion folders too.

``load_pipeline(path_or_id)`` accepts

- a local folder in the diffusers layout: ``model_index.json`` plus ``unet/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/`` and, for latent models, ``vae/`` (``safety_checker/`` and
  ``feature_extractor/`` are ignored), or
- a Hugging Face repo id (``org/name``) that is already in the local cache; nothing is downloaded.

A DDPM-family folder's scheduler, whatever it is, becomes a ``DDIMScheduler`` built from its config (that is what the
DDPM side of every method is defined on); a folder whose scheduler is ``FlowMatchEulerDiscreteScheduler`` (the tiny
flow world; rectified-flow models) keeps it, and ``diffalign.process`` runs the flow's steps on it (``kind`` says
which).  All loaded weights are frozen; LoRA adds the trainable ones.

SDXL-shaped folders (``text_encoder_2/`` and ``tokenizer_2/`` beside the others, a UNet with
``addition_embed_type = "text_time"``) load through the same function and run through the same samplers and
methods.  Their conditioning is what ``StableDiffusionXLPipeline`` builds: both encoders' penultimate hidden
states concatenated (77 x 2048 for SDXL), the second encoder's pooled, projected embedding, and the added time ids
(original size, crop corner, target size: the default (H, W, 0, 0, H, W)); the unconditional input is all zeros
(``force_zeros_for_empty_prompt``, SDXL's default).  So that every sampler, method and stored trajectory keeps one
conditioning tensor, ``encode_prompts`` packs the pooled embedding into one extra token at the end of the hidden
states (``[pooled, 0, ...]``), and the UNet's ``forward`` (patched on the instance, nothing else changed) unpacks
it into ``added_cond_kwargs``; the time ids are the pipeline's constant.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types

import torch
from huggingface_hub import snapshot_download

from diffalign.conditioning import pack_pooled
from diffalign.errors import BenchError

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
LAYOUT = ("a diffusers text-to-image folder: model_index.json with unet/, text_encoder/, tokenizer/, "
          "scheduler/ and optionally vae/ (SDXL: also text_encoder_2/ and tokenizer_2/), or an SD3- or FLUX-shaped "
          "one (transformer/, its text encoders, vae/, a flow-matching scheduler/)")


@dataclasses.dataclass
class Pipeline:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # diffusers.DDIMScheduler, or FlowMatchEulerDiscreteScheduler for a flow model
    vae: torch.nn.Module | None
    path: str
    text_encoder_2: torch.nn.Module | None = None  # SDXL: the second text encoder (with projection) ...
    tokenizer_2: object = None                      # ... and its tokenizer
    force_zeros_for_empty_prompt: bool = True       # SDXL: the empty (unconditional) prompt encodes as zeros

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        c = self.unet.config
        return (c.in_channels, c.sample_size, c.sample_size)

    @property
    def kind(self) -> str:
        """The noising process: "ddpm" or "flow" (``diffalign.process``), recorded in every run's manifest."""
        return "flow" if type(self.scheduler).__name__.startswith("FlowMatch") else "ddpm"

    @property
    def is_latent(self) -> bool:
        return self.vae is not None

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def text_dim(self) -> int:
        """Width of the conditioning tensor ``encode_prompts`` returns (the UNet's cross-attention width)."""
        return self.unet.config.cross_attention_dim

    def to(self, device=None, dtype=None) -> "Pipeline":
        for m in (self.unet, self.text_encoder, self.text_encoder_2, self.vae):
            if m is not None:
                same_dtype = dtype is None or next(m.parameters()).dtype == dtype
                m.to(device=device) if same_dtype else m.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings exactly as StableDiffusionPipeline makes them (max-length padding); for SDXL as
        StableDiffusionXLPipeline does, with the pooled embedding packed as one extra token (module docstring)."""
        if self.is_sdxl:
            return self._encode_sdxl(list(prompts))
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def _encode_sdxl(self, prompts: list[str]) -> torch.Tensor:
        hidden, pooled = [], None
        for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            out = encoder(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected, pooled output (CLIPTextModelWithProjection)
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        hidden = torch.cat(hidden, dim=-1)
        if self.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return pack_pooled(hidden, pooled).to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels) -> images in [0, 1]; differentiable, so rewards can backprop."""
        x = latents
        if self.vae is not None:
            x = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return (x / 2 + 0.5).clamp(0, 1)


def _sdxl_forward(self, sample, timestep, encoder_hidden_states, *args, added_cond_kwargs=None, **kwargs):
    """The UNet's forward for packed SDXL conditioning (``pack_pooled``), bound to the instance by the loader."""
    if added_cond_kwargs is None:
        pooled = encoder_hidden_states[:, -1, :self.sdxl_pooled_dim]
        time_ids = self.sdxl_time_ids.to(pooled.device, pooled.dtype).expand(pooled.shape[0], -1)
        encoder_hidden_states = encoder_hidden_states[:, :-1]
        added_cond_kwargs = {"text_embeds": pooled, "time_ids": time_ids}
    return type(self).forward(self, sample, timestep, encoder_hidden_states, *args,
                              added_cond_kwargs=added_cond_kwargs, **kwargs)


def _make_sdxl_unet(unet, vae, path: str) -> None:
    """Teach the UNet to read packed conditioning: its pooled width and the default added time ids."""
    c = unet.config
    pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    if not 0 < pooled_dim <= c.cross_attention_dim:
        raise BenchError(f"model folder {path!r}: an SDXL UNet whose pooled text width ({pooled_dim}) does not fit "
                         f"its cross-attention width ({c.cross_attention_dim}); accepted: {LAYOUT}")
    scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
    size = c.sample_size * scale
    unet.sdxl_pooled_dim = pooled_dim
    unet.sdxl_time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
    unet.forward = types.MethodType(_sdxl_forward, unet)


def resolve_path(path_or_id: str) -> str:
    """A local folder as is; a Hugging Face repo id through the local cache only."""
    if os.path.isdir(path_or_id):
        return path_or_id
    # "org/name" whose "org" is not a local folder: a repo id
    looks_like_id = path_or_id.count("/") == 1 and not path_or_id.startswith((".", "/", "~")) \
        and not os.path.isdir(path_or_id.split("/")[0])
    if looks_like_id:
        try:
            return snapshot_download(path_or_id, local_files_only=True)
        except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ...
            raise BenchError(f"model {path_or_id!r} is neither a local folder nor in the Hugging Face cache "
                             f"({type(e).__name__}); accepted: a local path to {LAYOUT}, or a repo id already in "
                             "the cache (HF_HOME / HF_HUB_CACHE)") from None
    raise BenchError(f"model folder {path_or_id!r} does not exist; accepted: a local path to {LAYOUT}, "
                     "or a Hugging Face repo id already in the local cache")


# The memory layout a run (``bench.core.run``) gives the UNet's convolutions: channels-last (NHWC), which oneDNN on the
# CPU and cuDNN on GPUs run without layout conversions.  Measured on 2 CPU cores (issue 27, docs/cost.md): a training
# step 4-10 % faster (AlignProp, DDPO-SF), the eval sampler 5 %; the convolutions sum in another order, so numbers move
# at float rounding (the tolerance: docs/cost.md).  ``load_pipeline``'s default stays contiguous, as diffusers'
# pipelines are, so parity with them holds to their tolerance.
RUN_MEMORY_FORMAT = torch.channels_last


def load_pipeline(path_or_id: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  memory_format: torch.memory_format = torch.contiguous_format) -> Pipeline:
    """The folder's pipeline on ``device`` in ``dtype``, every module frozen and in eval mode, the UNet's weights in
    ``memory_format`` (``RUN_MEMORY_FORMAT`` for a run)."""
    import diffusers  # lazy: heavy packages (seconds to import)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # no per-load "Loading weights" bars in run logs
    path = resolve_path(path_or_id)
    index_path = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_path):
        raise BenchError(f"model folder {path!r} has no model_index.json; accepted: {LAYOUT}")
    try:
        with open(index_path) as f:
            index = json.load(f)
        if not isinstance(index, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise BenchError(f"model folder {path!r}: model_index.json is malformed ({e}); accepted: {LAYOUT}") from None

    def load(name, loader):
        try:
            return loader()
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise BenchError(f"model folder {path!r}: cannot load {name}/ ({first[:200]}); "
                             f"accepted: {LAYOUT}") from None

    def class_of(name, library, default):
        entry = index.get(name)
        cls_name = entry[1] if isinstance(entry, list) and len(entry) == 2 and entry[1] else default
        return getattr(library, cls_name, getattr(library, default))

    if os.path.isdir(os.path.join(path, "transformer")):  # SD3- and FLUX-shaped rectified-flow folders
        from diffalign.flow_models import TRANSFORMER_KINDS, load_flow_model

        cls = (index.get("transformer") or [None, None])[1]
        if cls not in TRANSFORMER_KINDS:
            raise BenchError(f"model folder {path!r} has a transformer/ of class {cls!r}; accepted: "
                             f"{', '.join(TRANSFORMER_KINDS)}, or {LAYOUT}")
        return load("transformer", lambda: load_flow_model(path, device=device, dtype=dtype))

    missing = [c for c in REQUIRED if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise BenchError(f"model folder {path!r} lacks {', '.join(m + '/' for m in missing)}; accepted: {LAYOUT}")
    unet = load("unet", lambda: diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet"))
    text_encoder = load("text_encoder", lambda: class_of("text_encoder", transformers, "CLIPTextModel")
                        .from_pretrained(path, subfolder="text_encoder"))
    tokenizer = load("tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer")))
    scheduler_class = diffusers.DDIMScheduler
    if class_of("scheduler", diffusers, "DDIMScheduler").__name__.startswith("FlowMatch"):
        scheduler_class = diffusers.FlowMatchEulerDiscreteScheduler  # a rectified-flow model keeps its own
    scheduler = load("scheduler", lambda: scheduler_class.from_config(
        scheduler_class.load_config(path, subfolder="scheduler")))
    vae = None
    if os.path.isdir(os.path.join(path, "vae")):
        vae = load("vae", lambda: diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae"))
    sdxl = {}
    if os.path.isdir(os.path.join(path, "text_encoder_2")):
        if getattr(unet.config, "addition_embed_type", None) != "text_time":
            raise BenchError(f"model folder {path!r} has text_encoder_2/ but its UNet takes no added text and time "
                             f"embeddings (addition_embed_type 'text_time'); accepted: {LAYOUT}, or an SDXL folder")
        sdxl = {"text_encoder_2": load("text_encoder_2", lambda: class_of(
                    "text_encoder_2", transformers, "CLIPTextModelWithProjection")
                    .from_pretrained(path, subfolder="text_encoder_2")),
                "tokenizer_2": load("tokenizer_2", lambda: transformers.AutoTokenizer.from_pretrained(
                    os.path.join(path, "tokenizer_2"))),
                "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
        _make_sdxl_unet(unet, vae, path)
    pipe = Pipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae,
                    path=path, **sdxl)
    for m in (unet, text_encoder, sdxl.get("text_encoder_2"), vae):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    pipe = pipe.to(device=device, dtype=dtype)
    unet.to(memory_format=memory_format)
    return pipe
