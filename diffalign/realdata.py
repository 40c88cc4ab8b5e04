"""Real (image, caption) data, for the methods that fine-tune on data (OGDM) and for the quality metric's
reference set.  One interface (``draw(n, generator) -> (captions, images in [0, 1])``), three sources:

- ``tiny-world``: the tiny world's renderer, an endless stream of captioned renders.  Each draw takes captions
  from the given prompt list (the run's train prompts, so the held-out eval captions are never trained on) and
  renders a fresh scene for each (``diffalign.world.scene_from_caption``), seeded from the run's generator, so a
  run's data repeats exactly and resumes exactly;
- a folder of images with captions: PNG/JPEG/WebP files with either a ``metadata.jsonl`` (one JSON object per line
  with ``file_name`` and ``text`` / ``caption`` / ``prompt``, the Hugging Face ``imagefolder`` layout) or a
  ``<image stem>.txt`` caption beside each image;
- a parquet file: one row per image, the image in ``image`` / ``jpg`` / ``png`` (bytes, ``{"bytes": ...}`` as
  ``datasets`` writes it, or a path relative to the file) and the caption in ``text`` / ``caption`` / ``prompt``.

Folders and files are read once into memory at the model's resolution and drawn with replacement.  A missing or
empty folder, an image without a caption, an undecodable image, a file without those columns: one error line.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import torch

from diffalign import world
from diffalign.errors import BenchError
from diffalign.images import decode_image, stack_images

TINY_WORLD = "tiny-world"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_KEYS = ("text", "caption", "prompt")
IMAGE_KEYS = ("image", "jpg", "png")
ACCEPTED = ("tiny-world (the renderer), a folder of PNG/JPEG/WebP images with metadata.jsonl (file_name + text) or a "
            ".txt caption per image, or a .parquet file with image (bytes or path) and text|caption|prompt columns")


class TinyWorldStream:
    """Endless captioned renders of the tiny world, captions drawn from ``prompts``."""

    name = TINY_WORLD

    def __init__(self, prompts: list[str]):
        bad = []
        for p in prompts:
            try:
                world.parse_caption(p)
            except ValueError:
                bad.append(p)
        if bad:
            raise BenchError(f"real data {TINY_WORLD!r} renders tiny-world captions, but the train prompts hold "
                             f"{bad[0]!r}; accepted: tiny-world captions, or a folder/parquet of real images")
        self.prompts = list(prompts)

    def draw(self, n: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator).tolist()
        seed = int(torch.randint(0, 2 ** 31 - 1, (1,), generator=generator))
        rng = np.random.default_rng(seed)
        captions = [self.prompts[i] for i in idx]
        images = np.stack([world.render(world.scene_from_caption(c, rng), rng) for c in captions])
        return captions, torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()

    def __len__(self) -> int:  # endless
        return 0


class ImageSet:
    """A fixed set of captioned images in memory, drawn with replacement."""

    def __init__(self, captions: list[str], images: torch.Tensor, name: str):
        self.captions, self.images, self.name = captions, images, name

    def draw(self, n: int, generator: torch.Generator) -> tuple[list[str], torch.Tensor]:
        idx = torch.randint(0, len(self.captions), (n,), generator=generator)
        return [self.captions[i] for i in idx.tolist()], self.images[idx]

    def __len__(self) -> int:
        return len(self.captions)


def _caption(record: dict, where: str) -> str:
    for k in CAPTION_KEYS:
        if isinstance(record.get(k), str) and record[k].strip():
            return record[k].strip()
    raise BenchError(f"{where}: no caption; accepted: a non-empty {' / '.join(CAPTION_KEYS)}")


def _read_folder(path: str, size: int | None) -> ImageSet:
    files = sorted(f for f in os.listdir(path) if f.lower().endswith(IMAGE_EXTENSIONS))
    meta_path = os.path.join(path, "metadata.jsonl")
    captions: dict[str, str] = {}
    if os.path.isfile(meta_path):
        with open(meta_path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{meta_path!r}, line {i}"
                try:
                    rec = json.loads(line)
                except ValueError:
                    raise BenchError(f"{where} is not JSON; accepted: one JSON object per line with file_name and "
                                     "text") from None
                if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
                    raise BenchError(f"{where}: no file_name; accepted: objects with file_name and text")
                captions[rec["file_name"]] = _caption(rec, where)
        files = sorted(captions)
    if not files:
        raise BenchError(f"real-data folder {path!r} holds no image; accepted: {ACCEPTED}")
    out_captions, arrays = [], []
    for name in files:
        where = f"real-data folder {path!r}, image {name!r}"
        if name not in captions:
            txt = os.path.join(path, os.path.splitext(name)[0] + ".txt")
            if not os.path.isfile(txt):
                raise BenchError(f"{where} has no caption (no metadata.jsonl entry, no {os.path.basename(txt)!r}); "
                                 f"accepted: {ACCEPTED}")
            with open(txt, encoding="utf-8") as f:
                text = f.read().strip()
            if not text:
                raise BenchError(f"{where}: its caption file is empty; accepted: a non-empty caption")
            captions[name] = text
        arrays.append(decode_image(name, path, where))
        out_captions.append(captions[name])
    return ImageSet(out_captions, stack_images(arrays, size), os.path.abspath(path))


def _read_parquet(path: str, size: int | None) -> ImageSet:
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow's errors of a damaged or foreign file
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise BenchError(f"real-data file {path!r} cannot be read ({first}); accepted: {ACCEPTED}") from None
    image_col = next((c for c in IMAGE_KEYS if c in df.columns), None)
    caption_col = next((c for c in CAPTION_KEYS if c in df.columns), None)
    if image_col is None or caption_col is None:
        raise BenchError(f"real-data file {path!r} has columns {sorted(map(str, df.columns))}; accepted: {ACCEPTED}")
    if not len(df):
        raise BenchError(f"real-data file {path!r} has no rows; accepted: {ACCEPTED}")
    base = os.path.dirname(os.path.abspath(path))
    captions, arrays = [], []
    for i, row in df.iterrows():
        where = f"real-data file {path!r}, row {i}"
        captions.append(_caption({caption_col: row[caption_col]}, where))
        arrays.append(decode_image(row[image_col], base, where))
    return ImageSet(captions, stack_images(arrays, size), os.path.abspath(path))


def load_real_data(spec: str, prompts: list[str], size: int | None = None):
    """The real-data source named by ``spec`` (see the module docstring); images at ``size`` x ``size``."""
    if spec == TINY_WORLD:
        return TinyWorldStream(prompts)
    if os.path.isdir(spec):
        return _read_folder(spec, size)
    if os.path.isfile(spec):
        if not spec.endswith(".parquet"):
            raise BenchError(f"real-data file {spec!r} is not a .parquet file; accepted: {ACCEPTED}")
        return _read_parquet(spec, size)
    raise BenchError(f"real data {spec!r} does not exist; accepted: {ACCEPTED}")
