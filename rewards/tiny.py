"""The tiny world's own reward models, committed under ``models/`` and trained by ``make tiny-rewards``
(``bench/tinyworld/train_rewards.py``).  All three are differentiable with respect to the image.

- ``tiny-clip`` (:class:`TinyClip`): CLIP score of ``models/tiny-clip``, a small open_clip model saved
  in the Hugging Face open_clip layout; the score is the cosine similarity of the image and prompt
  embeddings, exactly the ``hpsv2`` / ``clipscore`` code path pointed at another folder.
- ``tiny-aesthetic`` (:class:`TinyAesthetic`): the LAION aesthetic predictor's architecture
  (L2-normalised CLIP image embedding -> MLP head) on tiny-clip, trained to predict the world's
  hidden rating :func:`diffalign.world.aesthetic_rating` (0-10); loaded by the same code as ``aesthetic``.
- ``tiny-count`` (:class:`TinyCount`): a small CNN's soft object count c (a density map summed) against
  the count n that the prompt asks for (``diffalign.world.parse_caption``); score = -(sqrt((c - n)^2 +
  0.25^2) - 0.25), a smooth -|c - n|, 0 when the count is right.  Independent of the judge.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from diffalign import world
from diffalign.errors import BenchError
from diffalign.store import PROJECT_ROOT
from diffalign.world import aesthetic_rating
from rewards.aesthetic import AestheticScorer, load_aesthetic
from rewards.clip_common import OpenClipScore, check_images, freeze, load_strict
from rewards.weights import OPEN_CLIP_CONFIG

MODELS = os.path.join(PROJECT_ROOT, "models")
RECIPE = "rebuild it with 'make tiny-rewards'"


def model_dir(name: str) -> str:
    return os.path.join(MODELS, name)


def _need(path: str, files: tuple[str, ...]) -> None:
    missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise BenchError(f"tiny reward folder {path!r} lacks {', '.join(missing)} ({RECIPE})")


class CountNet(nn.Module):
    """Fully convolutional: a non-negative density map at 1/4 resolution whose sum is the soft count."""

    def __init__(self, width: int = 24):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=2, dilation=2), nn.ReLU(), nn.Conv2d(2 * w, 1, 1),
        )
        nn.init.constant_(self.net[-1].bias, -4.0)  # start near zero density (softplus(-4) ~ 0.02 per cell)
        self.config = {"width": width}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, 32, 32) in [0, 1] -> soft counts (B,)."""
        return F.softplus(self.net(images * 2 - 1)).flatten(1).sum(1)


def _to_size(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return images


class TinyClip(OpenClipScore):
    """Cosine similarity of tiny-clip's image and prompt embeddings (in [-1, 1]): ``hpsv2``'s scorer."""

    def __init__(self, path: str | None = None, preprocess: str | None = None):
        path = path or model_dir("tiny-clip")
        _need(path, (OPEN_CLIP_CONFIG, "open_clip_model.safetensors"))
        super().__init__(path, name="tiny-clip", preprocess=preprocess)


class TinyAesthetic(AestheticScorer):
    """Predicted hidden rating (about 0-10) from tiny-clip's normalised image embedding: ``aesthetic``'s
    scorer (``load_aesthetic``) on the folder that ``models/tiny-aesthetic/config.json`` names."""

    def __init__(self, path: str | None = None, preprocess: str | None = None):
        path = path or model_dir("tiny-aesthetic")
        _need(path, ("config.json",))
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        _need(path, (cfg["head"],))
        clip = os.path.normpath(os.path.join(path, cfg["clip"]))
        _need(clip, (OPEN_CLIP_CONFIG, "open_clip_model.safetensors"))
        scorer = load_aesthetic(clip, os.path.join(path, cfg["head"]), name="tiny-aesthetic", preprocess=preprocess)
        super().__init__(scorer.backbone, scorer.head, name="tiny-aesthetic", preprocess=preprocess)


class TinyCount:
    """-(sqrt((soft count - asked count)^2 + 0.25^2) - 0.25): 0 when right, about -|error| otherwise."""

    name = "tiny-count"
    differentiable = True
    EPS = 0.25

    def __init__(self, path: str | None = None):
        path = path or model_dir("tiny-count")
        _need(path, ("config.json", "model.safetensors"))
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        self.model = CountNet(width=cfg["width"])
        load_strict(self.model, load_file(os.path.join(path, "model.safetensors")), path=path, who=self.name)
        freeze(self.model)

    def to(self, device):
        self.model.to(device)
        return self

    def count(self, images: torch.Tensor) -> torch.Tensor:
        """The soft object count of each image (B,), differentiable."""
        check_images(images, who=self.name)
        dev = next(self.model.parameters()).device
        return self.model(_to_size(images.float().to(dev), 32))

    def asked(self, prompts: list[str]) -> torch.Tensor:
        try:
            return torch.tensor([float(world.parse_caption(p)["count"]) for p in prompts])
        except ValueError as e:
            raise BenchError(f"reward 'tiny-count' reads the object count from tiny-world prompts: {e}") from None

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_images(images, prompts, who=self.name)
        c = self.count(images)
        d = c - self.asked(prompts).to(c.device)
        return -((d * d + self.EPS ** 2).sqrt() - self.EPS)


class TinyRating:
    """The hidden rating itself (:func:`diffalign.world.aesthetic_rating`, 0-10), computed from pixels.

    Not a learned model: the ground truth that ``tiny-aesthetic`` predicts.  Used as a held-out
    metric, it shows when a method raises the predictor's score without raising the rating (reward
    hacking of the reward model).  Not differentiable (median filter and clipping in numpy)."""

    name = "tiny-rating"
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.from_numpy(aesthetic_rating(images.detach().float().cpu().numpy())).float()
