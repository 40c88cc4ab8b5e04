"""The reward registry: every reward maps a batch of images in [0, 1] and their prompts to scores.

A reward is any object with

    name: str
    differentiable: bool          # True if gradients flow from the score back to the images
    __call__(images, prompts) -> torch.Tensor of shape (B,)

Methods that backpropagate the reward (AlignProp) refuse a non-differentiable one.
"""
from __future__ import annotations

from bench.errors import BenchError
from rewards.jpeg import JpegCompressibility, JpegIncompressibility
from rewards.pixel import Saturation

REGISTRY = {
    "jpeg-compressibility": JpegCompressibility,
    "jpeg-incompressibility": JpegIncompressibility,
    "saturation": Saturation,
}


def get_reward(name: str):
    if name not in REGISTRY:
        raise BenchError(f"unknown reward {name!r}; accepted: {', '.join(sorted(REGISTRY))}")
    return REGISTRY[name]()
