"""Differentiable pixel-statistics rewards for the tiny world."""
from __future__ import annotations

import torch


class Saturation:
    """Mean colourfulness: per pixel max(R, G, B) - min(R, G, B), averaged over the image (in [0, 1]).

    On the tiny world's black background it rewards larger and purer coloured objects, so AlignProp
    learns it in a few dozen steps and the grids show what it did (and what it cost in fidelity)."""

    name = "saturation"
    differentiable = True

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        x = images.float()
        return (x.amax(dim=1) - x.amin(dim=1)).flatten(1).mean(1)
