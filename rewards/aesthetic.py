"""LAION aesthetic predictor v2, the aesthetic reward of DDPO and AlignProp.

    score = MLP( e / ||e|| ),   e = CLIP ViT-L/14 image embedding (projected, 768-d)

The head ``sac+logos+ava1-l14-linearMSE.pth`` is a plain state dict of five Linear layers,
``layers.{0,2,4,6,7}.{weight,bias}`` (768 -> 1024 -> 128 -> 64 -> 16 -> 1, float32, dropouts at 1, 3, 5
and no non-linearity), so the score is an affine map of the normalised embedding, on the AVA 1-10
scale.  The prompt is not used.

Files (see ``rewards/weights.py`` for the search order; nothing is downloaded):

* head: ``head=`` / ``DIFFALIGN_AESTHETIC_HEAD`` / ``$DIFFALIGN_WEIGHTS/laion-aesthetic-v2/<file>``
  (published at github.com/christophschuhmann/improved-aesthetic-predictor, Apache-2.0);
* CLIP: ``clip=`` / ``DIFFALIGN_CLIP_L14`` / ``$DIFFALIGN_WEIGHTS/openai/clip-vit-large-patch14`` / the
  Hugging Face cache of ``openai/clip-vit-large-patch14`` (a transformers ``CLIPModel`` folder).

The backbone is pluggable: ``load_aesthetic(clip=<folder>, head=<file>)`` takes a transformers CLIP
folder or an open_clip folder in the Hugging Face layout, and reads the head's widths from its
state dict.  The tiny world's ``tiny-aesthetic`` is this same code on ``tiny-clip``.

Preprocessing (``preprocess=`` or ``DIFFALIGN_PREPROCESS``): ``tensor`` (default) is AlignProp's
differentiable path (resize to 224, no crop, CLIP mean/std); ``processor`` is DDPO's CLIPProcessor
path (uint8, bicubic shortest side 224, centre crop), not differentiable.  They differ slightly; the
tests measure it.
"""
from __future__ import annotations

import re

import torch

from diffalign.errors import BenchError
from rewards import weights
from rewards.clip_common import (
    ClipBackbone,
    check_images,
    check_preprocess,
    freeze,
    load_clip,
    load_state_dict,
    load_strict,
)

_KEY = re.compile(r"^layers\.(\d+)\.(weight|bias)$")
_DROPOUT = {1: 0.2, 3: 0.2, 5: 0.1}  # the published head's dropouts (inactive in eval mode)


class AestheticHead(torch.nn.Module):
    """The improved-aesthetic-predictor MLP; Linear layers wherever the state dict has weights,
    Dropout between them, so the keys are exactly the published ``layers.<i>.weight/bias``."""

    def __init__(self, widths: dict[int, tuple[int, int]]):
        super().__init__()
        mods = []
        for i in range(max(widths) + 1):
            if i in widths:
                out_f, in_f = widths[i]
                mods.append(torch.nn.Linear(in_f, out_f))
            else:
                mods.append(torch.nn.Dropout(_DROPOUT.get(i, 0.0)))
        self.layers = torch.nn.Sequential(*mods)

    @property
    def in_features(self) -> int:
        return next(m for m in self.layers if isinstance(m, torch.nn.Linear)).in_features

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds)


def load_head(path: str, *, who: str = "aesthetic") -> AestheticHead:
    """The head from a ``.pth`` state dict (``layers.<i>.weight/bias``), widths read from the shapes."""
    sd = load_state_dict(path, who=who)
    bad = [k for k in sd if not _KEY.match(k)]
    if bad or not sd:
        raise BenchError(f"reward {who!r}: {path} is not an aesthetic head; expected keys layers.<i>.weight/bias "
                         f"(the published file has layers.0,2,4,6,7), got {', '.join(bad[:3]) or 'nothing'}")
    widths = {int(_KEY.match(k).group(1)): tuple(v.shape) for k, v in sd.items() if k.endswith(".weight")}
    order = sorted(widths)
    chain_ok = all(len(widths[i]) == 2 for i in order) and all(
        widths[a][0] == widths[b][1] for a, b in zip(order, order[1:])) and widths[order[-1]][0] == 1
    if not chain_ok:
        raise BenchError(f"reward {who!r}: {path}: layer shapes {[widths[i] for i in order]} do not chain "
                         "into one score; expected Linear(d, h1) -> ... -> Linear(h, 1)")
    head = AestheticHead(widths)
    load_strict(head, {k: v.float() for k, v in sd.items()}, path=path, who=who)
    return freeze(head)


class AestheticScorer:
    """``head(normalised CLIP image embedding)`` for any CLIP backbone; prompts are ignored."""

    def __init__(self, backbone: ClipBackbone, head: AestheticHead, *, name: str = "aesthetic",
                 preprocess: str | None = None):
        self.backbone, self.head, self.name = backbone, head, name
        self.preprocess = check_preprocess(preprocess, name)
        self.differentiable = self.preprocess == "tensor"

    def to(self, device):
        self.backbone.to(device)
        self.head.to(device)
        return self

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        emb = self.backbone.encode_image(self.backbone.preprocess(images, self.preprocess)).float()
        return emb / torch.linalg.vector_norm(emb, dim=-1, keepdim=True)

    def __call__(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        check_images(images, prompts, who=self.name)
        return self.head(self.embed(images)).squeeze(-1)


def load_aesthetic(clip: str, head: str, *, name: str = "aesthetic", preprocess: str | None = None) -> AestheticScorer:
    """The predictor from a CLIP folder (transformers or HF open_clip layout) and a head file."""
    head_module = load_head(head, who=name)
    backbone = load_clip(clip, who=name, with_text=False)
    with torch.no_grad():
        probe = backbone.encode_image(torch.zeros(1, 3, backbone.image_size, backbone.image_size))
    if probe.shape[-1] != head_module.in_features:
        raise BenchError(f"reward {name!r}: the CLIP at {clip} embeds to {probe.shape[-1]} dims but the head "
                         f"{head} expects {head_module.in_features}")
    return AestheticScorer(backbone, head_module, name=name, preprocess=preprocess)


class LaionAesthetic(AestheticScorer):
    """The published predictor: CLIP ViT-L/14 + ``sac+logos+ava1-l14-linearMSE.pth``."""

    def __init__(self, clip: str | None = None, head: str | None = None, preprocess: str | None = None):
        preprocess = check_preprocess(preprocess, "aesthetic")
        errors, found = [], {}
        for key, spec, given in (("head", weights.AESTHETIC_HEAD, head), ("clip", weights.CLIP_L14, clip)):
            try:
                found[key] = weights.locate(spec, given, reward="aesthetic")
            except BenchError as e:
                errors.append(str(e))
        if errors:
            raise BenchError(" | ".join(errors))
        scorer = load_aesthetic(found["clip"], found["head"], name="aesthetic", preprocess=preprocess)
        super().__init__(scorer.backbone, scorer.head, name="aesthetic", preprocess=preprocess)
