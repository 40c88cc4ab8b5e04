"""Shared by both sides of the ImageReward parity check: the prompts, the test images and the vocabulary.

Runs under the isolated environment (original package) and the project's (our implementation); needs only
numpy and PIL.  Everything is deterministic, so both sides can rebuild the same inputs from a seed.
"""
import json
import os
import string

import numpy as np
from PIL import Image

PROMPTS = [
    "a red cat sitting on a blue chair",
    "A PHOTO of two dogs running in the snow, 4k, highly detailed!",
    "an oil painting of a castle on a hill at sunset",
    "",
    "a small green frog wearing a tiny crown",
    "Crème brûlée on a plate; café style (trending on artstation)",
    "a horse",
    "a very long prompt about a garden with many flowers and trees and birds and a house and a river and "
    "mountains far away under a cloudy sky with the sun going down slowly behind the hills",
    "an astronaut riding a horse on mars [ENC] [DEC]",
    "zxqv unknownword photographically",
]
# (height, width): square, portrait, landscape, smaller than 224 (upsampled), larger (downsampled), exact 224
SIZES = [(224, 224), (256, 256), (300, 200), (200, 300), (512, 512), (181, 250), (240, 320), (480, 640),
         (224, 224), (224, 300)]

WORDS = ("a an the of in on at with and under behind far away many very long about two tiny small green red "
         "blue cat dog dogs chair photo painting oil castle hill sunset frog wear ##ing crown plate cafe style "
         "trending art station horse garden flowers trees birds house river mountains cloudy sky sun going down "
         "slowly hills astronaut riding mars snow highly detailed prompt creme brulee photographic ##ally run "
         "sit ##s ##ed ##ly 4k").split()


def write_vocab(folder: str, size: int = 30522) -> int:
    """A bert-base-uncased-shaped vocab.txt ([PAD]=0, [unused*], [UNK]=100, [CLS]=101, [SEP]=102,
    [MASK]=103, characters, ##characters, some words), padded with filler tokens to ``size`` lines."""
    toks = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.punctuation + string.digits + string.ascii_lowercase
    toks += list(chars) + ["##" + c for c in string.ascii_lowercase + string.digits]
    toks += [w for w in dict.fromkeys(WORDS) if w not in toks]
    toks += [f"filler{i}" for i in range(size - len(toks))]
    assert len(set(toks)) == len(toks) == size
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(toks) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512}, f)
    return len(toks)


def write_images(folder: str, seed: int = 0) -> list[str]:
    """Smooth random RGB images (low-frequency noise + a gradient + a little pixel noise) saved as PNG."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i, (h, w) in enumerate(SIZES):
        coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)
        x = np.asarray(coarse, dtype=np.float32)
        x += np.linspace(-40, 40, w)[None, :, None] + rng.normal(0, 12, (h, w, 3))
        path = os.path.join(folder, f"image_{i:02d}.png")
        Image.fromarray(np.clip(x, 0, 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def hf_cache_put(cache: str, repo: str, files: dict[str, str], revision: str = "0" * 40) -> str:
    """Lay files out as huggingface_hub's cache does (models--org--name/snapshots/<rev>, refs/main)."""
    root = os.path.join(cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", revision)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(revision)
    for name, src in files.items():
        dst = os.path.join(snap, name)
        if os.path.lexists(dst):
            os.remove(dst)
        os.replace(src, dst)
    return snap
