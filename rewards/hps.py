"""HPSv2 and HPSv2.1: human preference scores from a fine-tuned OpenCLIP ViT-H-14.

    score = cos(E_img, E_txt)   (L2-normalised embeddings, no logit scale; the HPSv2 benchmark
                                 tables print 100 x this)

The model is open_clip's built-in ``ViT-H-14`` config, built with random weights (open_clip's
``pretrained=`` is never used, so the LAION base weights are not fetched) and then loaded strictly
from the published checkpoint, exactly as the ``hpsv2`` package's ``load_state_dict(checkpoint['state_dict'])``
does.  Tokenizer: open_clip's BPE (bundled with open_clip_torch), context 77.

Checkpoint container: a ``torch.save`` pickle of ``{'state_dict': {...}}`` (the hpsv2 package indexes
``checkpoint['state_dict']``).  It is read with ``torch.load(weights_only=True)``; if the file held
anything but tensors and plain containers, it is refused with a message saying that
``DIFFALIGN_TRUST_PICKLE=1`` (or ``trust_pickle=True``) unpickles it fully.  A bare state dict and
a ``module.`` prefix are accepted too.

Files (nothing is downloaded; see ``rewards/weights.py``):

* ``hpsv2``:   ``checkpoint=`` / ``DIFFALIGN_HPS_CHECKPOINT`` / ``$DIFFALIGN_WEIGHTS/xswu/HPSv2/HPS_v2_compressed.pt``
  / the Hugging Face cache of ``xswu/HPSv2``;
* ``hpsv2.1``: ``checkpoint=`` / ``DIFFALIGN_HPS21_CHECKPOINT`` / ``.../HPS_v2.1_compressed.pt`` likewise.

v2.0 and v2.1 scores are not comparable with each other.  Differentiable on the ``tensor`` path
(AlignProp's: resize to 224, CLIP mean/std, no crop); ``preprocess="processor"`` is the package's
own PIL path (bicubic resize, centre crop).
"""
from __future__ import annotations

from rewards import weights
from rewards.clip_common import OpenClipScore, check_preprocess

__all__ = ["HPSv2", "HPSv21", "OpenClipScore"]

HPS_ARCH = "ViT-H-14"


class _HPS(OpenClipScore):
    spec: weights.Published
    reward_name: str

    def __init__(self, checkpoint: str | None = None, preprocess: str | None = None, *,
                 arch: str | dict = HPS_ARCH, trust_pickle: bool | None = None):
        preprocess = check_preprocess(preprocess, self.reward_name)
        path = weights.locate(self.spec, checkpoint, reward=self.reward_name)
        super().__init__(arch, path, name=self.reward_name, preprocess=preprocess, trust_pickle=trust_pickle)


class HPSv2(_HPS):
    """HPS v2.0 (``HPS_v2_compressed.pt``), the version AlignProp trains on."""

    spec = weights.HPS_V2
    reward_name = "hpsv2"


class HPSv21(_HPS):
    """HPS v2.1 (``HPS_v2.1_compressed.pt``), the version of the HPSv2 benchmark's current tables."""

    spec = weights.HPS_V21
    reward_name = "hpsv2.1"
