"""PickScore v1: a CLIP ViT-H/14 fine-tuned on Pick-a-Pic preferences, through transformers' CLIPModel.

    score = logit_scale.exp() * cos(E_img, E_txt)      (logit scale ~ 100, so scores ~ 20)

as the PickScore README computes it (before its optional softmax over candidate images).

Files (nothing is downloaded; see ``rewards/weights.py``):

* model: ``model=`` / ``DIFFALIGN_PICKSCORE`` / ``$DIFFALIGN_WEIGHTS/yuvalkirstain/PickScore_v1`` / the Hugging
  Face cache of ``yuvalkirstain/PickScore_v1`` (a ``CLIPModel`` folder: ``config.json`` + weights);
* tokenizer: ``processor=`` / ``DIFFALIGN_PICKSCORE_PROCESSOR``, else the model folder when it has
  tokenizer files, else ``$DIFFALIGN_WEIGHTS/laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` / the Hugging Face
  cache of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K`` (the processor the README loads).  Prompts are
  padded / truncated to 77 tokens.

Differentiable on the ``tensor`` path (resize to 224, CLIP mean/std, no crop); ``processor`` is the
CLIPProcessor path (bicubic shortest side, centre crop) and is not.
"""
from __future__ import annotations

import os

import torch

from diffalign.errors import BenchError
from rewards import weights
from rewards.clip_common import ClipCosine, check_preprocess, load_hf_clip


def _has_tokenizer(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "tokenizer_config.json"))


class PickScore(ClipCosine):
    def __init__(self, model: str | None = None, processor: str | None = None, preprocess: str | None = None):
        preprocess = check_preprocess(preprocess, "pickscore")
        errors = []
        try:
            model = weights.locate(weights.PICKSCORE, model, reward="pickscore")
        except BenchError as e:
            errors.append(str(e))
            model = None
        if processor or os.environ.get(weights.PICKSCORE_PROCESSOR.env) or not (model and _has_tokenizer(model)):
            try:
                processor = weights.locate(weights.PICKSCORE_PROCESSOR, processor, reward="pickscore")
            except BenchError as e:
                errors.append(str(e))
        else:
            processor = model
        if errors:
            raise BenchError(" | ".join(errors))
        backbone = load_hf_clip(model, processor, who="pickscore")
        super().__init__(backbone, name="pickscore", preprocess=preprocess)

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        cos = self.cosine(images, prompts)
        return self.backbone.logit_scale.exp().to(cos.device) * cos
