"""JPEG (in)compressibility, exactly as DDPO defines it.

The image is quantised to uint8 (``round(x * 255)``), saved as JPEG at quality 95 with PIL, and its
size taken in kB = bytes / 1000.  Compressibility = -size (smaller files score higher),
incompressibility = +size.  Not differentiable: for policy-gradient methods.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

QUALITY = 95


def jpeg_size_kb(images: torch.Tensor) -> torch.Tensor:
    arr = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    sizes = []
    for im in arr.transpose(0, 2, 3, 1):
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im)).save(buf, format="JPEG", quality=QUALITY)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegCompressibility:
    name = "jpeg-compressibility"
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return -jpeg_size_kb(images)


class JpegIncompressibility:
    name = "jpeg-incompressibility"
    differentiable = False

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return jpeg_size_kb(images)
