"""ImageReward v1.0 (Xu et al. 2023), rebuilt on plain torch + the transformers BERT tokenizer.

Why not the ``image-reward`` package: it pins timm 0.6.13 (open_clip needs timm >= 1.0.17) and its BLIP
code calls transformers APIs that 5.x removed, so it cannot be installed beside this suite.  This module
re-implements the same network with the same parameter names, so the published ``ImageReward.pt`` loads
into it with strict key matching; ``parity/imagereward.sh`` runs the original package in its own
environment and checks that both give the same scores (``make parity``).

The model (BLIP "pretrain" backbone + an MLP head):

1. image -> Resize(224, bicubic, shorter side) -> CenterCrop(224) -> CLIP mean/std normalisation;
2. BLIP ViT-L/16 (24 pre-norm blocks of width 1024, 16 heads, LayerNorm eps 1e-6) -> 197 image tokens;
3. prompt -> BERT ``bert-base-uncased`` WordPiece ids with BLIP's extra tokens ``[DEC]`` and ``[ENC]``,
   padded / truncated to 35 tokens;
4. a BERT-base text encoder (``med_config.json``: 12 post-norm layers of width 768) whose every layer
   self-attends over the prompt and then cross-attends to the image tokens;
5. the ``[CLS]`` output -> MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts, no activations) -> r;
6. score = (r - 0.16717) / 1.03334, so that scores are roughly standard normal on the authors' data.

Two pre-processing paths, as for the LAION aesthetic reward:

* ``preprocess="tensor"`` (default, differentiable): the resize / crop / normalise of step 1 as torch ops on
  the image tensor, exactly ReFL's ``score_gard`` input pipeline (torchvision's tensor resize = bicubic
  interpolation with antialiasing).  Gradients reach the image.
* ``preprocess="pil"`` (not differentiable): the package's ``ImageReward.score(prompt, PIL image)`` path:
  the image is quantised to uint8, resized by PIL's bicubic filter, cropped and converted back.  PIL and torch
  bicubic differ slightly on images that need resizing (up to 4e-3 in the score on the parity check's
  random-weight model); on 224 x 224 images the two paths agree to float precision.

Files, looked up locally only (never a download; nothing here opens a network connection):

* ``ImageReward.pt`` (a plain state dict, float32, 625 entries) and ``med_config.json``, published in the
  Hugging Face model repo ``THUDM/ImageReward``;
* the ``bert-base-uncased`` tokenizer (``vocab.txt``; ``tokenizer_config.json`` optional), published in the
  Hugging Face model repo ``google-bert/bert-base-uncased``.

Search order for each file: the explicit argument (``weights=``, ``med_config=``, ``tokenizer=``), then the
folder ``model_dir=`` or ``$DIFFALIGN_IMAGEREWARD_DIR`` (tokenizer files directly in it or in a
``bert-base-uncased/`` sub-folder), then the Hugging Face cache (``$HF_HUB_CACHE`` / ``$HF_HOME``), then
``~/.cache/ImageReward`` (where the original package downloads to).

Strict loading: every tensor of the file must match a parameter of the model by name and shape and vice
versa (the original loads with ``strict=False`` and so hides missing keys).  The one exception is
``blip.text_encoder.embeddings.position_ids``, a constant ``arange`` buffer that the published file carries:
it is checked for its value and dropped.  The vision encoder's size is read from the state dict (width from
``cls_token``, depth from the block count, patch and image size from ``patch_embed`` and ``pos_embed``, heads =
width / 64 as in BLIP's ViT-B and ViT-L), the text encoder's from ``med_config.json``; the published files
give exactly ViT-L/16 + BERT-base, the tests use a narrower, shallower model saved in the same format.
"""
from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import try_to_load_from_cache
from PIL import Image
from torch import nn

from diffalign.errors import BenchError

HF_REPO = "THUDM/ImageReward"
WEIGHTS_FILE = "ImageReward.pt"
CONFIG_FILE = "med_config.json"
TOKENIZER_REPOS = ("google-bert/bert-base-uncased", "bert-base-uncased")
TOKENIZER_FILE = "vocab.txt"
TOKENIZER_OPTIONAL = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")
ENV_DIR = "DIFFALIGN_IMAGEREWARD_DIR"

IMAGE_SIZE = 224
MAX_TOKENS = 35
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
VISION_HEAD_DIM = 64  # BLIP's ViT-B (768 / 12) and ViT-L (1024 / 16)
VISION_LN_EPS = 1e-6
PROJ_DIM = 256  # BLIP_Pretrain's vision_proj / text_proj: in the file, unused for the score
POSITION_IDS = "blip.text_encoder.embeddings.position_ids"
_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "gelu_new": lambda: nn.GELU(approximate="tanh")}


# ---------------------------------------------------------------------------------------------------------
# The network.  Attribute names follow the published state dict (blip.visual_encoder.*, blip.text_encoder.*,
# mlp.layers.*), so ``model.state_dict()`` has exactly the file's keys.

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
    """Multi-head scaled dot-product attention on (B, L, D) tensors; ``mask`` is added to the logits."""
    b, lq, d = q.shape
    split = lambda x: x.view(b, x.shape[1], heads, d // heads).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b, lq, d)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(attention(q, k, v, self.heads))


class ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=VISION_LN_EPS)
        self.attn = ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=VISION_LN_EPS)
        self.mlp = ViTMlp(width, mlp_hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """BLIP's ViT: patches + [CLS] + learned positions -> pre-norm blocks -> LayerNorm; returns all tokens."""

    def __init__(self, image_size: int, patch: int, width: int, depth: int, heads: int, mlp_hidden: int):
        super().__init__()
        grid = image_size // patch
        self.patch_embed = PatchEmbed(patch, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + 1, width))
        self.blocks = nn.ModuleList([ViTBlock(width, heads, mlp_hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(width, eps=VISION_LN_EPS)

    def forward(self, pixels):
        x = self.patch_embed(pixels)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed[:, : x.shape[1] + 1]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class TextEmbeddings(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden_size"], padding_idx=cfg["pad_token_id"])
        self.position_embeddings = nn.Embedding(cfg["max_position_embeddings"], cfg["hidden_size"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden_size"], eps=cfg["layer_norm_eps"])

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(positions))


class QKV(nn.Module):
    def __init__(self, hidden: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class AddNorm(nn.Module):
    """Post-norm residual: LayerNorm(dense(h) + residual)."""

    def __init__(self, d_in: int, hidden: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h, residual):
        return self.LayerNorm(self.dense(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, kv_width: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = QKV(hidden, kv_width)
        self.output = AddNorm(hidden, hidden, eps)

    def forward(self, h, context, mask=None):
        a = attention(self.self.query(h), self.self.key(context), self.self.value(context), self.heads, mask)
        return self.output(a, h)


class Intermediate(nn.Module):
    def __init__(self, hidden: int, inner: int, act: str):
        super().__init__()
        self.dense = nn.Linear(hidden, inner)
        self.act = _ACTIVATIONS[act]()

    def forward(self, h):
        return self.act(self.dense(h))


class BertLayer(nn.Module):
    """Self-attention over the prompt, cross-attention to the image tokens, feed-forward (each post-norm)."""

    def __init__(self, cfg: dict, image_width: int):
        super().__init__()
        d, heads, eps = cfg["hidden_size"], cfg["num_attention_heads"], cfg["layer_norm_eps"]
        self.attention = BertAttention(d, d, heads, eps)
        self.crossattention = BertAttention(d, image_width, heads, eps)
        self.intermediate = Intermediate(d, cfg["intermediate_size"], cfg["hidden_act"])
        self.output = AddNorm(cfg["intermediate_size"], d, eps)

    def forward(self, h, text_mask, image_tokens):
        h = self.attention(h, h, text_mask)
        h = self.crossattention(h, image_tokens)  # every image token is attended (BLIP's all-ones image mask)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, cfg: dict, image_width: int):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(cfg, image_width) for _ in range(cfg["num_hidden_layers"])])


class TextEncoder(nn.Module):
    """BLIP's BERT with cross-attention (``mode='multimodal'``, bidirectional), no pooler."""

    def __init__(self, cfg: dict, image_width: int):
        super().__init__()
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = BertEncoder(cfg, image_width)

    def forward(self, ids, attention_mask, image_tokens):
        # BERT's additive padding mask: 0 where attended, -10000 on padding
        mask = (1.0 - attention_mask[:, None, None, :].to(image_tokens.dtype)) * -10000.0
        h = self.embeddings(ids)
        for layer in self.encoder.layer:
            h = layer(h, mask, image_tokens)
        return h


class Blip(nn.Module):
    def __init__(self, text_cfg: dict, vision: dict):
        super().__init__()
        self.visual_encoder = VisionTransformer(**vision)
        self.text_encoder = TextEncoder(text_cfg, vision["width"])
        self.vision_proj = nn.Linear(vision["width"], PROJ_DIM)
        self.text_proj = nn.Linear(text_cfg["hidden_size"], PROJ_DIM)


def reward_head(width: int) -> nn.Sequential:
    """ImageReward's MLP: width -> 1024 -> 128 -> 64 -> 16 -> 1 with dropouts and no activations."""
    return nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))


class MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.layers = reward_head(width)


class ImageRewardModel(nn.Module):
    """The network; ``score(ids, mask, pixels)`` is ReFL's ``score_gard`` (normalised reward, differentiable)."""

    def __init__(self, text_cfg: dict, vision: dict):
        super().__init__()
        self.text_cfg, self.vision = dict(text_cfg), dict(vision)
        self.blip = Blip(text_cfg, vision)
        self.mlp = MLP(text_cfg["hidden_size"])

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        image_tokens = self.blip.visual_encoder(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image_tokens)
        r = self.mlp.layers(text[:, 0]).squeeze(-1)
        return (r - REWARD_MEAN) / REWARD_STD


# ---------------------------------------------------------------------------------------------------------
# Configuration and strict loading

_TEXT_DEFAULTS = {"layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0,
                  "position_embedding_type": "absolute", "add_cross_attention": True}
_TEXT_REQUIRED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
                  "max_position_embeddings")


def read_med_config(path: str) -> dict:
    """The text encoder's settings from BLIP's ``med_config.json`` (a BERT config; ``encoder_width`` is ignored:
    BLIP replaces it with the vision width, as we do)."""
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"ImageReward: cannot read {path} as JSON ({e}); accepted: the med_config.json "
                         f"published in {HF_REPO}") from None
    missing = [k for k in _TEXT_REQUIRED if k not in raw]
    if missing:
        raise BenchError(f"ImageReward: {path} lacks {', '.join(missing)}; accepted: a BERT config like the "
                         f"med_config.json published in {HF_REPO}")
    cfg = {**_TEXT_DEFAULTS, **{k: raw[k] for k in raw if k in _TEXT_DEFAULTS}}
    cfg.update({k: int(raw[k]) for k in _TEXT_REQUIRED})
    if cfg["position_embedding_type"] != "absolute" or not cfg["add_cross_attention"]:
        raise BenchError(f"ImageReward: {path} asks for position_embedding_type="
                         f"{cfg['position_embedding_type']!r}, add_cross_attention={cfg['add_cross_attention']}; "
                         "accepted: 'absolute' and true, as in the published med_config.json")
    if cfg["hidden_act"] not in _ACTIVATIONS:
        raise BenchError(f"ImageReward: hidden_act {cfg['hidden_act']!r} in {path}; accepted: "
                         f"{', '.join(_ACTIVATIONS)}")
    if cfg["hidden_size"] % cfg["num_attention_heads"]:
        raise BenchError(f"ImageReward: hidden_size {cfg['hidden_size']} in {path} is not a multiple of "
                         f"num_attention_heads {cfg['num_attention_heads']}")
    return cfg


def vision_config(state: dict) -> dict:
    """The ViT's size, read from the state dict's shapes (the package hard-codes ViT-L/16 at 224)."""
    p = "blip.visual_encoder."
    need = [p + "cls_token", p + "pos_embed", p + "patch_embed.proj.weight", p + "blocks.0.mlp.fc1.weight"]
    absent = [k for k in need if k not in state]
    if absent:
        raise BenchError(f"ImageReward: the weights file lacks {', '.join(absent)}; accepted: the state dict of "
                         f"{WEIGHTS_FILE} as published in {HF_REPO}")
    width = state[p + "cls_token"].shape[-1]
    patch = state[p + "patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state[p + "pos_embed"].shape[1] - 1)
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(re.escape(p) + r"blocks\.(\d+)\.", k)))
    if width % VISION_HEAD_DIM:
        raise BenchError(f"ImageReward: vision width {width} is not a multiple of {VISION_HEAD_DIM} (BLIP's head "
                         "size); accepted: BLIP ViT-B (768) or ViT-L (1024) and narrower multiples of 64")
    return dict(image_size=grid * patch, patch=patch, width=width, depth=depth, heads=width // VISION_HEAD_DIM,
                mlp_hidden=state[p + "blocks.0.mlp.fc1.weight"].shape[0])


def load_model(weights: str, med_config: str) -> ImageRewardModel:
    """Build the network from ``med_config.json`` + the state dict's shapes and load ``ImageReward.pt`` strictly."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise BenchError(f"ImageReward: cannot read {weights} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                         f"accepted: {WEIGHTS_FILE} as published in {HF_REPO} (a torch state dict)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BenchError(f"ImageReward: {weights} is not a state dict of tensors; accepted: {WEIGHTS_FILE} as "
                         f"published in {HF_REPO}")
    state = dict(state)
    pos = state.pop(POSITION_IDS, None)
    if pos is not None and not torch.equal(pos.flatten().long(), torch.arange(pos.numel())):
        raise BenchError(f"ImageReward: {POSITION_IDS} in {weights} is not 0..N-1; accepted: the published file")
    model = ImageRewardModel(read_med_config(med_config), vision_config(state))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})" if unexpected else "",
                 "shape mismatch: " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                                                for k in wrong[:3]) if wrong else ""]
        raise BenchError(f"ImageReward: {weights} does not match the architecture from {med_config}: "
                         f"{'; '.join(p for p in parts if p)}; accepted: {WEIGHTS_FILE} and {CONFIG_FILE} from "
                         f"{HF_REPO} (the same release)")
    model.load_state_dict(state, strict=True)
    return model.float().eval().requires_grad_(False)


def load_tokenizer(folder: str, vocab_size: int):
    """``bert-base-uncased`` + BLIP's extra special tokens ``[DEC]`` (bos) and ``[ENC]``, from local files only."""
    from transformers import BertTokenizer  # lazy: heavy package

    try:
        tok = BertTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise BenchError(f"ImageReward: cannot load the BERT tokenizer from {folder} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]}); accepted: a folder with the vocab.txt of "
                         f"{TOKENIZER_REPOS[0]}") from None
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    if len(tok) > vocab_size:
        raise BenchError(f"ImageReward: the tokenizer in {folder} has {len(tok)} tokens with [DEC]/[ENC] but "
                         f"med_config.json's vocab_size is {vocab_size}; accepted: the vocab.txt of "
                         f"{TOKENIZER_REPOS[0]} (30522 tokens)")
    return tok


# ---------------------------------------------------------------------------------------------------------
# Finding the files (local paths, the Hugging Face cache, ~/.cache/ImageReward; never the network)

def _from_hf_cache(repo: str, filename: str) -> str | None:
    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _tokenizer_dir(folder: str | None) -> str | None:
    if not folder:
        return None
    for d in (folder, os.path.join(folder, "bert-base-uncased")):
        if os.path.isfile(os.path.join(d, TOKENIZER_FILE)):
            return d
    return None


def find_files(weights=None, med_config=None, tokenizer=None, model_dir=None) -> tuple[str, str, str]:
    """(ImageReward.pt, med_config.json, tokenizer folder); a BenchError naming what is missing otherwise."""
    folder = model_dir or os.environ.get(ENV_DIR) or None
    legacy = os.path.expanduser("~/.cache/ImageReward")
    looked = []

    def pick(explicit, name, what):
        if explicit:
            if os.path.isfile(explicit):
                return explicit
            looked.append(f"{what}={explicit}")
            return None
        for cand in ([os.path.join(folder, name)] if folder else []):
            if os.path.isfile(cand):
                return cand
        cached = _from_hf_cache(HF_REPO, name)
        if cached:
            return cached
        cand = os.path.join(legacy, name)
        return cand if os.path.isfile(cand) else None

    w = pick(weights, WEIGHTS_FILE, "weights")
    c = pick(med_config, CONFIG_FILE, "med_config")
    if tokenizer:
        t = _tokenizer_dir(tokenizer)
        if t is None:
            looked.append(f"tokenizer={tokenizer}")
    else:
        t = _tokenizer_dir(folder)
        for repo in TOKENIZER_REPOS:
            if t is None and (v := _from_hf_cache(repo, TOKENIZER_FILE)):
                t = os.path.dirname(v)
        t = t or _tokenizer_dir(legacy)
    missing = [n for n, f in ((WEIGHTS_FILE, w), (CONFIG_FILE, c), (f"bert-base-uncased {TOKENIZER_FILE}", t))
               if f is None]
    if missing:
        where = [f"{ENV_DIR}={folder}" if folder else f"${ENV_DIR} (unset)", "the Hugging Face cache", legacy] + looked
        raise BenchError(
            f"ImageReward: {', '.join(missing)} not found (looked in: {'; '.join(where)}); accepted: "
            f"{WEIGHTS_FILE} and {CONFIG_FILE} from the Hugging Face repo {HF_REPO} and the {TOKENIZER_FILE} of "
            f"{TOKENIZER_REPOS[0]}, all in one folder named by {ENV_DIR} (the tokenizer may sit in its "
            "bert-base-uncased/ sub-folder), or passed as weights=/med_config=/tokenizer=, or in a pre-filled "
            "Hugging Face cache; nothing is downloaded")
    return w, c, t


# ---------------------------------------------------------------------------------------------------------
# Pre-processing

def _resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's Resize(int): the shorter side becomes ``size``, the longer one int(size * long / short)."""
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def _crop_box(h: int, w: int, size: int) -> tuple[int, int]:
    """torchvision's CenterCrop offsets (top, left), with Python's round."""
    return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


def _normalise(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(CLIP_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


def preprocess_tensor(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Differentiable Resize(size, bicubic, antialias) + CenterCrop(size) + CLIP normalisation (ReFL's path)."""
    h, w = images.shape[-2:]
    nh, nw = _resized_size(h, w, size)
    if (nh, nw) != (h, w):
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = _crop_box(nh, nw, size)
    return _normalise(images[..., top: top + size, left: left + size])


def preprocess_pil(images: torch.Tensor, size: int = IMAGE_SIZE) -> torch.Tensor:
    """The package's PIL path: uint8 image -> PIL bicubic resize -> centre crop -> [0, 1] -> CLIP normalisation."""
    arr = (images.detach().float().cpu() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arr:
        im = Image.fromarray(np.ascontiguousarray(a))
        nh, nw = _resized_size(im.height, im.width, size)
        if (nh, nw) != (im.height, im.width):
            im = im.resize((nw, nh), Image.BICUBIC)
        top, left = _crop_box(nh, nw, size)
        im = im.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return _normalise(torch.stack(out))


# ---------------------------------------------------------------------------------------------------------
# The reward

class ImageReward:
    """ImageReward v1.0 as a suite reward: ``__call__(images (B,3,H,W) in [0,1], prompts) -> (B,)`` scores.

    Files come from the arguments, ``model_dir`` / ``$DIFFALIGN_IMAGEREWARD_DIR`` or the Hugging Face cache (see
    the module docstring).  ``preprocess="tensor"`` is differentiable (ReFL); ``"pil"`` reproduces the package's
    ``score()`` on PIL images and is not.
    """

    name = "imagereward"

    def __init__(self, weights: str | None = None, med_config: str | None = None, tokenizer: str | None = None,
                 model_dir: str | None = None, preprocess: str = "tensor"):
        if preprocess not in ("tensor", "pil"):
            raise BenchError(f"ImageReward: preprocess={preprocess!r}; accepted: 'tensor' (differentiable) or 'pil'")
        self.files = find_files(weights, med_config, tokenizer, model_dir)
        self.preprocess = preprocess
        self.differentiable = preprocess == "tensor"
        self.model = load_model(self.files[0], self.files[1])
        self.tokenizer = load_tokenizer(self.files[2], self.model.text_cfg["vocab_size"])
        self.image_size = self.model.vision["image_size"]

    def to(self, device):
        self.model.to(device)
        return self

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3 or len(prompts) != images.shape[0]:
            raise BenchError(f"ImageReward: got images of shape {tuple(images.shape)} and {len(prompts)} prompts; "
                             "accepted: a (B, 3, H, W) tensor in [0, 1] and B prompts")
        device = next(self.model.parameters()).device
        if self.preprocess == "tensor":
            pixels = preprocess_tensor(images.to(device=device, dtype=torch.float32), self.image_size)
        else:
            pixels = preprocess_pil(images, self.image_size).to(device)
        ids, mask = self.tokenize(prompts)
        return self.model.score(ids.to(device), mask.to(device), pixels).to(images.device)
