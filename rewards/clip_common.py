"""What every CLIP-family reward shares: image preprocessing, one frozen backbone type, two loaders.

Preprocessing (images arrive as float (B, 3, H, W) in [0, 1]):

* ``tensor``: AlignProp's differentiable path: resize the tensor to the model's input size
  (``S x S``, bilinear with antialiasing, as ``torchvision.transforms.Resize(S)`` does on a square
  tensor), no crop, then CLIP mean/std.  Only torch ops, so gradients reach the images.
* ``processor``: DDPO's path through ``CLIPProcessor``: quantise to uint8 (``round(x * 255)``), resize
  the shortest side to ``S`` with PIL bicubic, centre-crop ``S x S``, rescale to [0, 1], mean/std.
  Not differentiable.  It matches transformers' PIL ``CLIPImageProcessor`` (a test checks it).

The two paths differ slightly (bilinear vs bicubic, uint8 rounding; on non-square images also the
crop); ``tests/test_published_rewards.py`` measures by how much.

Backbones (``ClipBackbone``, frozen: eval mode, ``requires_grad=False``; gradients still flow to the
images through it):

* ``load_hf_clip(folder)``: a transformers ``CLIPModel`` folder (``config.json`` + weights), with its
  tokenizer from the same folder or another one;
* ``load_open_clip(model, checkpoint)``: an open_clip model, either from a folder in the Hugging
  Face open_clip layout (``open_clip_config.json`` = ``{"model_cfg": ..., "preprocess_cfg": ...}``
  + ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``), or from an architecture
  (open_clip's built-in name such as ``"ViT-H-14"``, or a ``model_cfg`` dict) plus a checkpoint file.
  The model is built from its config only (never open_clip's ``pretrained=`` download) and the state
  dict is loaded strictly;
* ``load_clip(path)`` picks one of the two from the folder's files.

``ClipCosine`` is the shared scorer: ``scale * cos(image embedding, prompt embedding)`` (optionally
clamped at 0); ``OpenClipScore`` is that scorer on an open_clip model, the code path of ``hpsv2``,
``hpsv2.1`` and the tiny world's ``tiny-clip``.
"""
from __future__ import annotations

import copy
import json
import os
import pickle
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from diffalign.errors import BenchError  # importing diffalign applies the torchvision shim (before open_clip loads)
from rewards.weights import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS = ("tensor", "processor")
TRUST_PICKLE_ENV = "DIFFALIGN_TRUST_PICKLE"
PREPROCESS_ENV = "DIFFALIGN_PREPROCESS"  # default preprocessing of every CLIP-family reward


# --- preprocessing --------------------------------------------------------------------------------

def check_images(images, prompts=None, *, who: str) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise BenchError(f"reward {who!r}: images must be a float tensor (B, 3, H, W) in [0, 1], got {got}")
    if prompts is not None and len(prompts) != images.shape[0]:
        raise BenchError(f"reward {who!r}: {images.shape[0]} images but {len(prompts)} prompts; accepted: one "
                         "prompt per image")


def check_preprocess(preprocess: str | None, who: str) -> str:
    """The given preprocessing, else $DIFFALIGN_PREPROCESS, else ``tensor``; BenchError if unknown."""
    preprocess = preprocess or os.environ.get(PREPROCESS_ENV) or "tensor"
    if preprocess not in PREPROCESS:
        raise BenchError(f"reward {who!r}: unknown preprocess {preprocess!r}; accepted: "
                         f"{', '.join(PREPROCESS)} (tensor = differentiable AlignProp path, "
                         "processor = DDPO's CLIPProcessor path)")
    return preprocess


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std


def tensor_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD,
                      mode: str = "bilinear") -> torch.Tensor:
    """Differentiable: resize to ``size x size`` (antialiased when shrinking), no crop, normalise."""
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode=mode, align_corners=False, antialias=True)
    return _normalise(x, mean, std)


def processor_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """DDPO's CLIPProcessor path: uint8, PIL bicubic resize of the shortest side, centre crop, normalise."""
    arr = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    out = []
    for im in arr.transpose(0, 2, 3, 1):
        h, w = im.shape[:2]
        short, long = min(h, w), max(h, w)
        new_long = int(size * long / short)
        new_h, new_w = (size, new_long) if h <= w else (new_long, size)
        pil = Image.fromarray(np.ascontiguousarray(im)).resize((new_w, new_h), resample=Image.BICUBIC)
        top, left = (new_h - size) // 2, (new_w - size) // 2
        crop = np.asarray(pil, dtype=np.float32)[top:top + size, left:left + size] / 255.0
        out.append(torch.from_numpy(crop.transpose(2, 0, 1).copy()))
    return _normalise(torch.stack(out).to(images.device), mean, std)


# --- loading state dicts ----------------------------------------------------------------------------

def trust_pickle_default() -> bool:
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def _looks_like_torch_save(path: str) -> bool:
    """A torch.save file: a zip archive (torch >= 1.6) or a legacy pickle (protocol 2+ starts with 0x80)."""
    with open(path, "rb") as f:
        first = f.read(1)
    return first == b"\x80" or zipfile.is_zipfile(path)


def load_state_dict(path: str, *, who: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A flat state dict from a ``.safetensors`` file or a torch pickle.

    Torch pickles are read with ``weights_only=True`` (tensors and plain containers only).  A file
    that needs full unpickling is refused unless ``trust_pickle`` (or DIFFALIGN_TRUST_PICKLE=1) says
    it comes from a trusted source.  A ``{"state_dict": ...}`` container is unwrapped and a
    ``module.`` prefix (DistributedDataParallel) removed."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        if not _looks_like_torch_save(path):
            raise OSError("neither a torch.save zip archive nor a pickle")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "WeightsUnpickler error" in ln), lines[0] if lines else "")
            raise BenchError(f"reward {who!r}: {path} holds objects that torch.load(weights_only=True) refuses "
                             f"({why[:160]}); if the file comes from its official source, set "
                             f"{TRUST_PICKLE_ENV}=1 (or trust_pickle=True) to unpickle it fully") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise BenchError(f"reward {who!r}: {path} cannot be read as a weight file ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:160] if str(e).strip() else ''})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BenchError(f"reward {who!r}: {path} is not a state dict (a dict of tensors, or one under 'state_dict')")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_strict(module: torch.nn.Module, state_dict: dict, *, path: str, who: str) -> None:
    """``module.load_state_dict(strict=True)`` with a one-line BenchError naming the mismatch."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        parts = [f"{n} {len(lst)} ({', '.join(lst[:3])}{', ...' if len(lst) > 3 else ''})"
                 for n, lst in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if lst]
        raise BenchError(f"reward {who!r}: {path} does not match the model: {'; '.join(parts)}")
    module.load_state_dict(state_dict, strict=True)


def freeze(module: torch.nn.Module) -> torch.nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


# --- backbones ---------------------------------------------------------------------------------------

class ClipBackbone(torch.nn.Module):
    """A frozen CLIP model with one interface over transformers and open_clip.

    ``encode_image(pixels)`` / ``encode_text(prompts)`` return the projected, *unnormalised*
    embeddings; ``image_size``, ``mean`` and ``std`` say how pixels must be prepared."""

    def __init__(self, model, tokenize, *, kind: str, image_size: int, mean, std, source: str):
        super().__init__()
        self.model = freeze(model)
        self._tokenize = tokenize
        self.kind, self.image_size, self.source = kind, int(image_size), source
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.model.logit_scale.detach().reshape(())

    def preprocess(self, images: torch.Tensor, how: str) -> torch.Tensor:
        if how == "tensor":
            return tensor_preprocess(images, self.image_size, self.mean, self.std)
        return processor_preprocess(images, self.image_size, self.mean, self.std)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device)
        if self.kind == "open_clip":
            return self.model.encode_image(pixels)
        out = self.model.get_image_features(pixel_values=pixels)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        tokens = self._tokenize(list(prompts))
        if self.kind == "open_clip":
            return self.model.encode_text(tokens.to(self.device))
        tokens = {k: v.to(self.device) for k, v in tokens.items()}
        out = self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask"))
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def is_open_clip_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, OPEN_CLIP_CONFIG))


def load_hf_clip(folder: str, tokenizer: str | None = None, *, who: str, with_text: bool = True) -> ClipBackbone:
    """A transformers ``CLIPModel`` folder, loaded strictly, local files only, in float32."""
    from transformers import AutoTokenizer, CLIPModel  # lazy: heavy package, only for HF-layout CLIPs

    model, info = CLIPModel.from_pretrained(folder, local_files_only=True, output_loading_info=True,
                                            dtype=torch.float32)
    bad = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise BenchError(f"reward {who!r}: {folder} does not match CLIPModel: "
                         + "; ".join(f"{k} {v[:3]}" for k, v in bad.items()))
    mean, std = CLIP_MEAN, CLIP_STD
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre):
        with open(pre) as f:
            cfg = json.load(f)
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
    tokenize = None
    if with_text:
        tok = AutoTokenizer.from_pretrained(tokenizer or folder, local_files_only=True)
        max_len = min(int(model.config.text_config.max_position_embeddings), 77)

        def tokenize(prompts):
            return tok(prompts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    return ClipBackbone(model, tokenize, kind="transformers", image_size=model.config.vision_config.image_size,
                        mean=mean, std=std, source=folder)


def _open_clip_class(model_cfg: dict):
    import open_clip  # lazy: heavy package, only for open_clip models

    cfg = copy.deepcopy(model_cfg)
    if "multimodal_cfg" in cfg:
        raise BenchError("open_clip CoCa models are not supported as rewards; accepted: CLIP / CustomTextCLIP configs")
    text_cfg, vision_cfg = cfg.setdefault("text_cfg", {}), cfg.setdefault("vision_cfg", {})
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = False  # never fetch a base text model
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
    return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg)


def _open_clip_tokenizer(model_cfg: dict, folder: str | None, *, who: str):
    """open_clip's BPE tokenizer (shipped inside open_clip_torch), or a Hugging Face tokenizer saved in
    the model folder when the config names one (``text_cfg.hf_tokenizer_name``); never a download."""
    import open_clip  # lazy: heavy package, only for open_clip models

    text_cfg = model_cfg.get("text_cfg", {})
    context = text_cfg.get("context_length", 77)
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    if "hf_tokenizer_name" not in text_cfg:
        return open_clip.tokenizer.SimpleTokenizer(context_length=context, **kwargs)
    if not folder or not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        raise BenchError(f"reward {who!r}: the open_clip config names a Hugging Face tokenizer "
                         f"({text_cfg['hf_tokenizer_name']!r}); accepted: its files (tokenizer_config.json, "
                         "tokenizer.json) saved in the model folder, as nothing is downloaded")
    mode = text_cfg.get("tokenizer_mode")
    return open_clip.tokenizer.HFTokenizer(folder, context_length=context, tokenizer_mode=mode, local_files_only=True,
                                           **kwargs)


def read_open_clip_folder(folder: str, *, who: str) -> tuple[dict, dict, str]:
    """``(model_cfg, preprocess_cfg, weights file)`` of a folder in the HF open_clip layout."""
    cfg_path = os.path.join(folder, OPEN_CLIP_CONFIG)
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        model_cfg = cfg["model_cfg"]
    except (OSError, ValueError, KeyError) as e:
        raise BenchError(f"reward {who!r}: {cfg_path} is not an open_clip config with 'model_cfg' ({e})") from None
    weights = next((os.path.join(folder, f) for f in OPEN_CLIP_WEIGHTS if os.path.isfile(os.path.join(folder, f))),
                   None)
    if weights is None:
        raise BenchError(f"reward {who!r}: open_clip folder {folder} has no weights; accepted: "
                         f"{' or '.join(OPEN_CLIP_WEIGHTS)} beside {OPEN_CLIP_CONFIG}")
    return model_cfg, cfg.get("preprocess_cfg", {}), weights


def load_open_clip(model: str | dict, checkpoint: str | None = None, *, who: str,
                   trust_pickle: bool | None = None) -> ClipBackbone:
    """An open_clip model from an HF-layout folder, or from an architecture + a checkpoint file."""
    import open_clip  # lazy: heavy package, only for open_clip models

    trust = trust_pickle_default() if trust_pickle is None else trust_pickle
    folder = None
    if isinstance(model, dict):
        model_cfg, pre_cfg = model, {}
    elif os.path.isdir(model):
        folder = model
        model_cfg, pre_cfg, weights = read_open_clip_folder(folder, who=who)
        checkpoint = checkpoint or weights
    else:
        model_cfg = open_clip.get_model_config(model)
        if model_cfg is None:
            raise BenchError(f"reward {who!r}: {model!r} is neither an open_clip folder ({OPEN_CLIP_CONFIG} + "
                             "weights) nor a built-in open_clip architecture such as 'ViT-H-14'")
        pre_cfg = {}
    if not checkpoint:
        raise BenchError(f"reward {who!r}: no checkpoint given for open_clip architecture {model!r}")
    net = _open_clip_class(model_cfg)
    load_strict(net, load_state_dict(checkpoint, who=who, trust_pickle=trust), path=checkpoint, who=who)
    size = pre_cfg.get("size", model_cfg.get("vision_cfg", {}).get("image_size", 224))
    size = size[0] if isinstance(size, (list, tuple)) else size
    if pre_cfg.get("resize_mode", "shortest") != "shortest":
        raise BenchError(f"reward {who!r}: preprocess_cfg resize_mode {pre_cfg['resize_mode']!r} is not supported; "
                         "accepted: 'shortest' (CLIP's resize + centre crop)")
    tokenizer = _open_clip_tokenizer(model_cfg, folder, who=who)
    return ClipBackbone(net, tokenizer, kind="open_clip", image_size=size, mean=pre_cfg.get("mean", CLIP_MEAN),
                        std=pre_cfg.get("std", CLIP_STD), source=folder or checkpoint)


def load_clip(path: str, tokenizer: str | None = None, *, who: str, with_text: bool = True) -> ClipBackbone:
    """A CLIP backbone from a folder: the HF open_clip layout, or a transformers CLIPModel folder."""
    if is_open_clip_folder(path):
        return load_open_clip(path, who=who)
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_hf_clip(path, tokenizer, who=who, with_text=with_text)
    raise BenchError(f"reward {who!r}: {path} is not a CLIP folder; accepted: a transformers CLIPModel folder "
                     f"(config.json + model.safetensors) or an open_clip folder ({OPEN_CLIP_CONFIG} + "
                     f"{' or '.join(OPEN_CLIP_WEIGHTS)})")


# --- the shared scorer ----------------------------------------------------------------------------------

class ClipCosine:
    """``scale * cos(E_img, E_txt)`` per (image, prompt), optionally ``max(., 0)``.

    Image embeddings keep the graph back to the images on the ``tensor`` path; prompt embeddings
    are computed without gradients and cached per prompt (prompts repeat across a run)."""

    differentiable = True

    def __init__(self, backbone: ClipBackbone, *, name: str, preprocess: str | None = None, scale: float = 1.0,
                 clamp_min: float | None = None):
        self.backbone, self.name = backbone, name
        self.preprocess = check_preprocess(preprocess, name)
        self.scale, self.clamp_min = scale, clamp_min
        self.differentiable = self.preprocess == "tensor"
        self._text_cache: dict[str, torch.Tensor] = {}

    def to(self, device):
        self.backbone.to(device)
        self._text_cache.clear()
        return self

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, who=self.name)
        emb = self.backbone.encode_image(self.backbone.preprocess(images, self.preprocess)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        new = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if new:
            emb = self.backbone.encode_text(new).float()
            for p, e in zip(new, emb / emb.norm(dim=-1, keepdim=True)):
                self._text_cache[p] = e
        return torch.stack([self._text_cache[p] for p in prompts])

    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts, who=self.name)
        img = self.image_embeds(images)
        return (img * self.text_embeds(prompts).to(img.device)).sum(-1)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        score = self.scale * self.cosine(images, prompts)
        return score if self.clamp_min is None else score.clamp_min(self.clamp_min)


class OpenClipScore(ClipCosine):
    """Cosine of normalised open_clip image and prompt embeddings (HPSv2's score; ``tiny-clip``'s).

    ``model`` is an open_clip folder in the HF layout, or an architecture (built-in name or
    ``model_cfg`` dict) together with ``checkpoint``."""

    def __init__(self, model: str | dict, checkpoint: str | None = None, *, name: str = "open-clip",
                 preprocess: str | None = None, scale: float = 1.0, trust_pickle: bool | None = None):
        backbone = load_open_clip(model, checkpoint, who=name, trust_pickle=trust_pickle)
        super().__init__(backbone, name=name, preprocess=preprocess, scale=scale)
