"""The tiny world's judge: a small CNN that reads colour, shape and object count off an image.

It gives the held-out **prompt-fidelity** metric: the fraction of samples whose colour, shape and
count (as the judge reads them) all match what the prompt asks for; each attribute is also reported
on its own.  Position words are not judged.  The judge is never a training reward.

It is trained (``make judge`` = ``python -m bench.tinyworld.judge``) on renders of the world with light
corruptions (Gaussian noise, blur, contrast jitter) so that it reads imperfect samples, plus blank /
noise-only images labelled count 0, so that an empty or garbage sample never counts as faithful.
Weights live in ``models/tiny-judge/`` as ``model.safetensors`` + ``config.json``.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffalign import world
from diffalign.errors import BenchError
from diffalign.store import atomic_dir

COLOURS = list(world.COLOURS)
SHAPES = list(world.SHAPES)
MAX_COUNT = 4
ATTRIBUTES = ("colour", "shape", "count")


class Judge(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({"colour": nn.Linear(128, len(COLOURS)), "shape": nn.Linear(128, len(SHAPES)),
                                    "count": nn.Linear(128, MAX_COUNT + 1)})
        self.config = {"width": width}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images: (B, 3, 32, 32) in [0, 1] -> logits per attribute."""
        h = self.features(images * 2 - 1)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def read(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != world.SIZE:
            images = F.interpolate(images, size=(world.SIZE, world.SIZE), mode="bilinear", antialias=True)
        return {k: v.argmax(-1).cpu() for k, v in self(images.float().cpu()).items()}

    def fidelity(self, images: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
        """Per-sample 0/1 matches for each attribute and for all of them ("all")."""
        got = self.read(images)
        want = [world.parse_caption(p) for p in prompts]
        out = {
            "colour": np.array([COLOURS.index(w["colour"]) for w in want]) == got["colour"].numpy(),
            "shape": np.array([SHAPES.index(w["shape"]) for w in want]) == got["shape"].numpy(),
            "count": np.array([w["count"] for w in want]) == got["count"].numpy(),
        }
        out["all"] = out["colour"] & out["shape"] & out["count"]
        return {k: v.astype(np.float64) for k, v in out.items()}


def save_judge(model: Judge, path: str, extra: dict | None = None) -> None:
    with atomic_dir(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**model.config, "colours": COLOURS, "shapes": SHAPES, "max_count": MAX_COUNT,
                       **(extra or {})}, f, indent=2)


def load_judge(path: str) -> Judge:
    cfg_path, w_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(w_path)):
        raise BenchError(f"judge folder {path!r} lacks config.json / model.safetensors "
                         "(rebuild it with 'make judge')")
    with open(cfg_path) as f:
        cfg = json.load(f)
    model = Judge(width=cfg["width"])
    model.load_state_dict(load_file(w_path), strict=True)
    return model.eval()


def corrupted_batch(rng: np.random.Generator, n: int, blank_frac: float = 0.08):
    """Renders with the corruptions the judge must see through, and their labels."""
    images, scenes = world.batch(rng, n)
    x = torch.from_numpy(images)
    labels = {"colour": torch.tensor([COLOURS.index(s.colour) for s in scenes]),
              "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
              "count": torch.tensor([s.count for s in scenes])}
    blank = torch.from_numpy(rng.random(n) < blank_frac)
    x[blank] = 0.0
    labels["count"][blank] = 0
    contrast = torch.from_numpy(rng.uniform(0.7, 1.15, size=(n, 1, 1, 1)).astype(np.float32))
    x = x * contrast
    blur = torch.from_numpy(rng.random(n) < 0.3)
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k2, groups=3)
    sigma = torch.from_numpy(rng.uniform(0.0, 0.12, size=(n, 1, 1, 1)).astype(np.float32))
    x = (x + sigma * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))).clamp(0, 1)
    return x, labels, blank


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the tiny world's judge.")
    p.add_argument("--out", default="models/tiny-judge")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=2000, help="held-out renders for the accuracy report")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    model = Judge()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=a.steps)
    for step in range(1, a.steps + 1):
        x, y, blank = corrupted_batch(rng, a.batch)
        logits = model(x)
        loss = F.cross_entropy(logits["count"], y["count"])
        keep = ~blank  # colour and shape are undefined on blank images
        loss = loss + F.cross_entropy(logits["colour"][keep], y["colour"][keep]) + \
            F.cross_entropy(logits["shape"][keep], y["shape"][keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    acc = evaluate(model, np.random.default_rng(12345), a.eval_samples)
    print("held-out accuracy on clean renders:", acc)
    save_judge(model, a.out, {"heldout_accuracy": acc, "steps": a.steps, "seed": a.seed})


def evaluate(model: Judge, rng: np.random.Generator, n: int) -> dict[str, float]:
    images, scenes = world.batch(rng, n)
    got = model.read(torch.from_numpy(images))
    return {
        "colour": float(np.mean([COLOURS.index(s.colour) == g for s, g in zip(scenes, got["colour"].tolist())])),
        "shape": float(np.mean([SHAPES.index(s.shape) == g for s, g in zip(scenes, got["shape"].tolist())])),
        "count": float(np.mean([s.count == g for s, g in zip(scenes, got["count"].tolist())])),
    }


if __name__ == "__main__":
    main()
