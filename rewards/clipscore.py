"""CLIPScore: CLIP image-prompt similarity, in one of three stated variants.

``variant=`` (or ``DIFFALIGN_CLIPSCORE_VARIANT``):

* ``hessel`` (default): ``2.5 * max(cos, 0)`` with OpenAI CLIP ViT-B/32 (``openai/clip-vit-base-patch32``),
  the definition of Hessel et al. 2021 (range [0, 2.5]);
* ``torchmetrics``: ``max(100 * cos, 0)`` with OpenAI CLIP ViT-L/14 (``openai/clip-vit-large-patch14``),
  torchmetrics' ``CLIPScore`` (range [0, 100]);
* ``cosine``: the raw cosine with ViT-B/32 (range [-1, 1]), smooth everywhere.

``cos`` is the cosine of the L2-normalised projected image and prompt embeddings.  All variants are
differentiable on the ``tensor`` path; the ``max(., 0)`` of the first two passes no gradient where
the cosine is negative (rare for real CLIP models, whose cosines sit around 0.2-0.35).

Model (nothing is downloaded; see ``rewards/weights.py``): ``model=`` / ``DIFFALIGN_CLIPSCORE_MODEL``
(any CLIP folder: transformers ``CLIPModel`` or open_clip in the HF layout; the variant then only sets
the scale) / ``$DIFFALIGN_WEIGHTS/<repo id>`` / the Hugging Face cache of the variant's repo.
Preprocessing: ``tensor`` (default; resize to the model's input size, CLIP mean/std, no crop) or
``processor`` (CLIPProcessor: bicubic shortest side, centre crop; not differentiable).
"""
from __future__ import annotations

import os

from diffalign.errors import BenchError
from rewards import weights
from rewards.clip_common import ClipCosine, check_preprocess, load_clip

VARIANT_ENV = "DIFFALIGN_CLIPSCORE_VARIANT"
# variant -> (published model, scale, clamp at)
VARIANTS = {
    "hessel": (weights.CLIP_B32, 2.5, 0.0),
    "torchmetrics": (weights.CLIP_L14_CLIPSCORE, 100.0, 0.0),
    "cosine": (weights.CLIP_B32, 1.0, None),
}


class ClipScore(ClipCosine):
    def __init__(self, model: str | None = None, variant: str | None = None, preprocess: str | None = None):
        variant = variant or os.environ.get(VARIANT_ENV) or "hessel"
        if variant not in VARIANTS:
            raise BenchError(f"reward 'clipscore': unknown variant {variant!r}; accepted: {', '.join(VARIANTS)} "
                             "(hessel = 2.5*max(cos,0) ViT-B/32, torchmetrics = max(100*cos,0) ViT-L/14, cosine)")
        preprocess = check_preprocess(preprocess, "clipscore")
        spec, scale, clamp_min = VARIANTS[variant]
        path = weights.locate(spec, model, reward="clipscore")
        self.variant = variant
        super().__init__(load_clip(path, who="clipscore"), name="clipscore", preprocess=preprocess, scale=scale,
                         clamp_min=clamp_min)
