"""Images from files and tables into the model's x_0: shared by the preference pairs and the real-data sources.

- ``decode_image``: PNG/JPEG bytes (or ``datasets``' ``{"bytes": ...}``), or a path relative to a base folder, to an
  RGB uint8 array, with one error line naming the place and what is accepted;
- ``stack_images``: arrays to one (N, 3, H, W) float tensor in [0, 1], resized (bilinear, antialiased) if asked;
- ``images_to_x0``: images in [0, 1] to the model's x_0 (pixels in [-1, 1] at its resolution, or the VAE's scaled
  latent mean for a latent model).
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from diffalign.errors import BenchError


def decode_image(value, base_dir: str, where: str) -> np.ndarray:
    """RGB uint8 (H, W, 3) of PNG/JPEG bytes or of a file path (relative to ``base_dir``)."""
    if isinstance(value, dict) and "bytes" in value:  # datasets' Image feature as parquet writes it
        value = value["bytes"] if value["bytes"] is not None else value.get("path")
    try:
        if isinstance(value, (bytes, bytearray, memoryview)):
            img = Image.open(io.BytesIO(bytes(value)))
        elif isinstance(value, str) and value:
            path = value if os.path.isabs(value) else os.path.join(base_dir, value)
            if not os.path.isfile(path):
                raise BenchError(f"{where}: image file {value!r} does not exist; accepted: PNG/JPEG bytes, or a path "
                                 "relative to the file that names it")
            img = Image.open(path)
        else:
            raise BenchError(f"{where}: image is {type(value).__name__}; accepted: PNG/JPEG bytes or a path")
        return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise BenchError(f"{where}: cannot decode the image ({type(e).__name__}); accepted: PNG or JPEG") from None


def stack_images(images: list[np.ndarray], size: int | None) -> torch.Tensor:
    """uint8 (H, W, 3) arrays -> (N, 3, size, size) float32 in [0, 1]."""
    out = []
    for a in images:
        x = torch.from_numpy(np.array(a)).permute(2, 0, 1).float() / 255.0
        if size is not None and tuple(x.shape[1:]) != (size, size):
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        out.append(x.clamp(0, 1))
    return torch.stack(out)


def image_size(pipe) -> int:
    """The pixel resolution of the model's images."""
    size = pipe.unet.config.sample_size
    return size * 2 ** (len(pipe.vae.config.block_out_channels) - 1) if pipe.vae is not None else size


def images_to_x0(pipe, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> the model's x_0: pixels in [-1, 1] at its resolution, or the VAE's scaled latent mean."""
    x = images.to(pipe.device, torch.float32) * 2 - 1
    if pipe.vae is None:
        size = pipe.unet.config.sample_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return x.to(pipe.dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mean
    return (latents * pipe.vae.config.scaling_factor).to(pipe.dtype)
