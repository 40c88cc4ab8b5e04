"""One loader for diffusers text-to-image folders: the tiny world today, Stable Diffusion folders too.

``load_pipeline(path_or_id)`` accepts

- a local folder in the diffusers layout: ``model_index.json`` plus ``unet/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/`` and, for latent models, ``vae/`` (``safety_checker/`` and
  ``feature_extractor/`` are ignored), or
- a Hugging Face repo id (``org/name``) that is already in the local cache; nothing is downloaded.

Whatever the folder's scheduler, sampling uses a ``DDIMScheduler`` built from its config (that is
what every method here is defined on).  All loaded weights are frozen; LoRA adds the trainable ones.
"""
from __future__ import annotations

import dataclasses
import json
import os

import torch
from huggingface_hub import snapshot_download

from diffalign.errors import BenchError

REQUIRED = ("unet", "text_encoder", "tokenizer", "scheduler")
LAYOUT = ("a diffusers text-to-image folder: model_index.json with unet/, text_encoder/, tokenizer/, "
          "scheduler/ and optionally vae/")


@dataclasses.dataclass
class Pipeline:
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # diffusers.DDIMScheduler
    vae: torch.nn.Module | None
    path: str

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
    def is_latent(self) -> bool:
        return self.vae is not None

    def to(self, device=None, dtype=None) -> "Pipeline":
        for m in (self.unet, self.text_encoder, self.vae):
            if m is not None:
                same_dtype = dtype is None or next(m.parameters()).dtype == dtype
                m.to(device=device) if same_dtype else m.to(device=device, dtype=dtype)
        return self

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings exactly as StableDiffusionPipeline makes them (max-length padding)."""
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixels) -> images in [0, 1]; differentiable, so rewards can backprop."""
        x = latents
        if self.vae is not None:
            x = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        return (x / 2 + 0.5).clamp(0, 1)


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


def load_pipeline(path_or_id: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Pipeline:
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
    missing = [c for c in REQUIRED if not os.path.isdir(os.path.join(path, c))]
    if missing:
        raise BenchError(f"model folder {path!r} lacks {', '.join(m + '/' for m in missing)}; accepted: {LAYOUT}")

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

    unet = load("unet", lambda: diffusers.UNet2DConditionModel.from_pretrained(path, subfolder="unet"))
    text_encoder = load("text_encoder", lambda: class_of("text_encoder", transformers, "CLIPTextModel")
                        .from_pretrained(path, subfolder="text_encoder"))
    tokenizer = load("tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(os.path.join(path, "tokenizer")))
    scheduler = load("scheduler", lambda: diffusers.DDIMScheduler.from_config(
        diffusers.DDIMScheduler.load_config(path, subfolder="scheduler")))
    vae = None
    if os.path.isdir(os.path.join(path, "vae")):
        vae = load("vae", lambda: diffusers.AutoencoderKL.from_pretrained(path, subfolder="vae"))
    pipe = Pipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler, vae=vae,
                    path=path)
    for m in (unet, text_encoder, vae):
        if m is not None:
            m.requires_grad_(False)
            m.eval()
    return pipe.to(device=device, dtype=dtype)
