"""Training recipes for the tiny world's own reward models (``make tiny-rewards``).

    python -m bench.tinyworld.train_rewards tiny-clip      --out models/tiny-clip
    python -m bench.tinyworld.train_rewards tiny-aesthetic --out models/tiny-aesthetic --clip models/tiny-clip
    python -m bench.tinyworld.train_rewards tiny-count     --out models/tiny-count

- **tiny-clip**: an ``open_clip.model.CLIP`` built from a small config (ViT on 32x32 images, patch 8;
  a text transformer on open_clip's standard BPE tokenizer, context 16), trained with CLIP's
  contrastive (InfoNCE) loss on tiny-world renders and their captions.  Because the grammar has only
  96 captions, every step contrasts each image with all 96 captions (the image->text direction with
  the complete set of negatives) and each caption of the batch with the batch's images
  (text->image, images of the same caption all count as positives).  Half of the images are
  degraded (:func:`degrade`), so the embedding also covers imperfect samples.  An auxiliary loss
  (weight ``AUX_WEIGHT``) regresses the hidden rating from the normalised image embedding through a
  throw-away head: a real CLIP learns image quality from web-scale data, while a tiny one trained on
  96 captions learns to ignore it (measured: a head on a purely contrastive tiny-clip explained only
  about half of the rating's variance on training data).  Saved in the
  Hugging Face open_clip layout (``open_clip_config.json`` + ``open_clip_model.safetensors``,
  fp16 storage; rows of token embeddings that no caption of the grammar uses are zeroed).
- **tiny-aesthetic**: the LAION aesthetic predictor's head (Linear, Dropout, Linear, Dropout,
  Linear, Dropout, Linear, Linear under ``layers``) on tiny-clip's frozen, L2-normalised image
  embedding, fitted by MSE to :func:`diffalign.world.aesthetic_rating` on clean and degraded renders.
  Saved as ``tiny-aesthetic.pth`` (a plain float32 ``state_dict``, the published file's format) and
  ``config.json`` naming the CLIP folder.
- **tiny-count**: a small fully convolutional network whose non-negative density map sums to a soft
  object count (:class:`rewards.tiny.CountNet`), fitted by MSE to the true count (0-6 objects,
  clean and degraded renders, blank images).  Independent of the judge (other architecture, other
  data, other loss); the judge stays the held-out fidelity metric.

Every recipe is deterministic for a given ``--seed`` and thread count and sized for 2 CPU cores.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from diffalign import world
from diffalign.store import atomic_dir
from rewards.clip_common import load_open_clip
from rewards.tiny import CountNet

CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": world.SIZE, "patch_size": 8, "width": 128, "layers": 4, "head_width": 32,
                   "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2,
                 "mlp_ratio": 2.0},
}
PREPROCESS_CFG = {"size": world.SIZE, "mean": [0.48145466, 0.4578275, 0.40821073],
                  "std": [0.26862954, 0.26130258, 0.27577711], "interpolation": "bicubic", "resize_mode": "shortest"}
HEAD_WIDTHS = (256, 64, 32, 16)  # the published head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1
AUX_WEIGHT = 0.25  # tiny-clip's auxiliary rating regression (see the module docstring)


# ---------------------------------------------------------------------------------------------------------
# Data: renders and degraded renders
# ---------------------------------------------------------------------------------------------------------

def _scaled(scene: world.Scene, s: float) -> world.Scene:
    objs = tuple((cx, cy, r * s) for cx, cy, r in scene.objects)
    return world.Scene(scene.colour, scene.shape, scene.count, scene.position, objs)


def _blur(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([0.25, 0.5, 0.25])
    k2 = (k[:, None] * k[None, :]).expand(3, 1, 3, 3).contiguous()
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k2, groups=3)


def degrade(rng: np.random.Generator, x: torch.Tensor) -> torch.Tensor:
    """Random degradations of (n, 3, H, W) images in [0, 1], each applied to a random subset: a
    tinted/grey background, blotchy low-frequency background noise, desaturation, contrast change,
    blur and pixel noise (grey or coloured).  What the base model's worse samples look like."""
    n, _, h, w = x.shape

    def pick(p):
        return torch.from_numpy(rng.random(n) < p).view(n, 1, 1, 1).float()

    def u(lo, hi, *shape):
        return torch.from_numpy(rng.uniform(lo, hi, size=(n, *shape)).astype(np.float32))

    fg = (x.amax(1, keepdim=True) / 0.4).clamp(0, 1)                     # where the objects are
    tint = u(0.0, 0.45, 1, 1, 1) + u(-0.08, 0.08, 3, 1, 1)
    x = x + pick(0.55) * (1 - fg) * tint
    blot = F.interpolate(torch.from_numpy(rng.standard_normal((n, 3, 4, 4)).astype(np.float32)), size=(h, w),
                         mode="bicubic", align_corners=False)
    x = x + pick(0.35) * (1 - fg) * u(0.0, 0.15, 1, 1, 1) * blot
    grey = x.mean(1, keepdim=True)
    x = x + pick(0.45) * u(0.0, 0.7, 1, 1, 1) * (grey - x)
    x = x * (1 + pick(0.3) * u(-0.4, 0.2, 1, 1, 1))
    x = torch.where(pick(0.3) > 0, _blur(x), x)
    x = torch.where(pick(0.15) > 0, _blur(x), x)
    noise = torch.from_numpy(rng.standard_normal((n, 3, h, w)).astype(np.float32))
    noise = torch.where(pick(0.5) > 0, noise[:, :1].expand(-1, 3, -1, -1), noise)
    x = x + pick(0.6) * u(0.0, 0.2, 1, 1, 1) * noise
    return x.clamp(0, 1)


def renders(rng: np.random.Generator, n: int, degraded: float = 0.5, scale: tuple[float, float] = (1.0, 1.0),
            counts: tuple[int, ...] = (1, 2, 3, 4), blank: float = 0.0):
    """n renders (a fraction ``degraded`` of them degraded) with object radii scaled by U(scale), and
    their scenes (None for the ``blank`` fraction of empty images)."""
    images, scenes = [], []
    for _ in range(n):
        if rng.random() < blank:
            images.append(np.zeros((world.SIZE, world.SIZE, 3), np.float32))
            scenes.append(None)
            continue
        count = int(counts[rng.integers(len(counts))])
        scene = world.sample_scene(rng, count=count) if count <= 4 else _many(rng, count)
        s = float(rng.uniform(*scale))
        images.append(world.render(_scaled(scene, s) if s != 1.0 else scene, rng))
        scenes.append(scene)
    x = torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    if degraded > 0:
        which = torch.from_numpy(rng.random(n) < degraded)
        x[which] = degrade(rng, x[which]) if which.any() else x[which]
    return x, scenes


def _many(rng: np.random.Generator, count: int) -> world.Scene:
    """A scene with more objects than the grammar's four (smaller radii), for the count model."""
    colour, shape = list(world.COLOURS)[rng.integers(4)], world.SHAPES[rng.integers(3)]
    objects: list[tuple[float, float, float]] = []
    while len(objects) < count:
        objects = []
        for _ in range(count):
            r = float(rng.uniform(3.0, 4.2))
            for _ in range(60):
                cx, cy = rng.uniform(r + 1, world.SIZE - r - 1, size=2)
                if all((cx - ox) ** 2 + (cy - oy) ** 2 > (r + orad + 1.5) ** 2 for ox, oy, orad in objects):
                    objects.append((float(cx), float(cy), r))
                    break
    return world.Scene(colour, shape, count, None, tuple(objects))


# ---------------------------------------------------------------------------------------------------------
# tiny-clip
# ---------------------------------------------------------------------------------------------------------

def build_clip(seed: int = 0):
    from open_clip.model import CLIP  # lazy: heavy package

    torch.manual_seed(seed)
    return CLIP(**CLIP_CONFIG)


def clip_normalise(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(PREPROCESS_CFG["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(PREPROCESS_CFG["std"]).view(1, 3, 1, 1)
    return (images - mean) / std


def tokenize(texts: list[str]) -> torch.Tensor:
    from open_clip.tokenizer import SimpleTokenizer  # lazy: heavy package

    return SimpleTokenizer(context_length=CLIP_CONFIG["text_cfg"]["context_length"])(texts)


def train_clip(out: str, steps: int = 800, batch: int = 128, lr: float = 2e-3, seed: int = 0,
               aux_weight: float = AUX_WEIGHT) -> dict:
    model = build_clip(seed)
    aux = aesthetic_head(CLIP_CONFIG["embed_dim"])  # discarded after training; tiny-aesthetic fits its own
    rng = np.random.default_rng(seed)
    captions = world.all_captions()
    index = {c: i for i, c in enumerate(captions)}
    tokens = tokenize(captions)
    opt = torch.optim.AdamW(list(model.parameters()) + list(aux.parameters()), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(1, steps + 1):
        x, scenes = renders(rng, batch, degraded=0.5, scale=(0.5, 1.8))
        y = torch.tensor([index[s.caption] for s in scenes])
        rating = torch.from_numpy(world.aesthetic_rating(x.numpy())).float()
        img = F.normalize(model.encode_image(clip_normalise(x)), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T           # (batch, 96)
        loss_i2t = F.cross_entropy(logits, y)
        present = y.unique()
        pos = (y[None, :] == present[:, None]).float()                          # caption -> its images
        t2i = logits.T[present].log_softmax(-1)
        loss_t2i = -(t2i * pos).sum(-1).div(pos.sum(-1)).mean()
        loss_aux = F.mse_loss(aux(img).squeeze(-1), rating)
        loss = (loss_i2t + loss_t2i) / 2 + aux_weight * loss_aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == 1:
            acc = (logits.argmax(-1) == y).float().mean().item()
            print(f"tiny-clip step {step} loss {loss.item():.3f} batch top-1 {acc:.3f} "
                  f"rating mse {loss_aux.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "aux_weight": aux_weight,
            "train_seconds": round(time.time() - t0, 1),
            "heldout_top1": retrieval_accuracy(model, np.random.default_rng(10_000 + seed))}
    print("tiny-clip held-out top-1 over the 96 captions:", info["heldout_top1"], flush=True)
    save_clip(model, out, tokens, info)
    return info


@torch.no_grad()
def retrieval_accuracy(model, rng: np.random.Generator, n: int = 960, degraded: float = 0.0) -> float:
    captions = world.all_captions()
    x, scenes = renders(rng, n, degraded=degraded)
    img = F.normalize(model.encode_image(clip_normalise(x)), dim=-1)
    txt = F.normalize(model.encode_text(tokenize(captions)), dim=-1)
    got = (img @ txt.T).argmax(-1)
    return float(np.mean([captions[g] == s.caption for g, s in zip(got.tolist(), scenes)]))


def save_clip(model, out: str, tokens: torch.Tensor, info: dict) -> None:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    used = torch.zeros(CLIP_CONFIG["text_cfg"]["vocab_size"], dtype=torch.bool)
    used[tokens.flatten()] = True  # start/end-of-text and padding (0) included
    state["token_embedding.weight"][~used] = 0.0  # never trained; zero rows keep the file compressible
    state = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    with atomic_dir(out) as tmp:
        save_file(state, os.path.join(tmp, "open_clip_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
            json.dump({"model_cfg": CLIP_CONFIG, "preprocess_cfg": PREPROCESS_CFG}, f, indent=2)
        with open(os.path.join(tmp, "training.json"), "w") as f:
            json.dump({"recipe": "python -m bench.tinyworld.train_rewards tiny-clip", "storage": "float16", **info}, f,
                      indent=2)


# ---------------------------------------------------------------------------------------------------------
# tiny-aesthetic
# ---------------------------------------------------------------------------------------------------------

def aesthetic_head(in_dim: int, widths: tuple[int, ...] = HEAD_WIDTHS) -> torch.nn.Module:
    """The LAION predictor's MLP (same layer list and key names, smaller widths)."""
    a, b, c, d = widths

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(in_dim, a), nn.Dropout(0.2), nn.Linear(a, b), nn.Dropout(0.2),
                                        nn.Linear(b, c), nn.Dropout(0.1), nn.Linear(c, d), nn.Linear(d, 1))

        def forward(self, x):
            return self.layers(x)

    return Head()


def aesthetic_data(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders with radii scaled 0.4-2.2x (from specks to frame-filling), 70 % degraded, 3 % blank."""
    x, _ = renders(rng, n, degraded=0.7, scale=(0.4, 2.2), blank=0.03)
    return x, torch.from_numpy(world.aesthetic_rating(x.numpy())).float()


@torch.no_grad()
def embed_images(clip, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    return torch.cat([F.normalize(clip.encode_image(clip_normalise(x[i:i + chunk])), dim=-1)
                      for i in range(0, len(x), chunk)])


def train_aesthetic(out: str, clip_dir: str, n: int = 16000, epochs: int = 60, lr: float = 1e-3, seed: int = 0) -> dict:
    t0 = time.time()
    clip = load_open_clip(clip_dir, who="tiny-aesthetic").model  # the loader the reward itself uses
    rng = np.random.default_rng(seed)
    x, y = aesthetic_data(rng, n)
    emb = embed_images(clip, x)
    print(f"tiny-aesthetic: {n} images embedded ({time.time() - t0:.0f} s); "
          f"rating mean {y.mean():.2f} sd {y.std():.2f}", flush=True)
    torch.manual_seed(seed)
    head = aesthetic_head(emb.shape[1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(n / 256)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        head.train()
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, 256):
            j = perm[i:i + 256]
            loss = F.mse_loss(head(emb[j]).squeeze(-1), y[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if (epoch + 1) % 10 == 0:
            print(f"tiny-aesthetic epoch {epoch + 1} train mse {loss.item():.3f}", flush=True)
    head.eval()
    xe, ye = aesthetic_data(np.random.default_rng(20_000 + seed), 2000)
    with torch.no_grad():
        pred = head(embed_images(clip, xe)).squeeze(-1)
    info = {"n": n, "epochs": epochs, "lr": lr, "seed": seed, "train_seconds": round(time.time() - t0, 1),
            "heldout": correlations(pred.numpy(), ye.numpy())}
    print("tiny-aesthetic held-out (clean + degraded renders):", info["heldout"], flush=True)
    save_aesthetic(head, out, clip_dir, info)
    return info


def correlations(pred: np.ndarray, true: np.ndarray) -> dict:
    def rank(v):
        return np.argsort(np.argsort(v)).astype(np.float64)

    return {"pearson": round(float(np.corrcoef(pred, true)[0, 1]), 4),
            "spearman": round(float(np.corrcoef(rank(pred), rank(true))[0, 1]), 4),
            "rmse": round(float(np.sqrt(np.mean((pred - true) ** 2))), 4), "n": int(len(true))}


def save_aesthetic(head, out: str, clip_dir: str, info: dict) -> None:
    state = OrderedDict((k, v.detach().float().clone().contiguous()) for k, v in head.state_dict().items())
    clip_rel = os.path.relpath(os.path.abspath(clip_dir), os.path.abspath(out))
    with atomic_dir(out) as tmp:
        torch.save(state, os.path.join(tmp, "tiny-aesthetic.pth"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({"clip": clip_rel, "head": "tiny-aesthetic.pth", "rating": "diffalign.world.aesthetic_rating",
                       "recipe": "python -m bench.tinyworld.train_rewards tiny-aesthetic", **info}, f, indent=2)


# ---------------------------------------------------------------------------------------------------------
# tiny-count
# ---------------------------------------------------------------------------------------------------------

def count_data(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, scenes = renders(rng, n, degraded=0.5, scale=(0.7, 1.4), counts=(1, 2, 3, 4, 5, 6), blank=0.08)
    return x, torch.tensor([0.0 if s is None else float(s.count) for s in scenes])


def train_count(out: str, steps: int = 2000, batch: int = 64, lr: float = 2e-3, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = CountNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(1, steps + 1):
        x, y = count_data(rng, batch)
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"tiny-count step {step} mse {loss.item():.4f} ({time.time() - t0:.0f} s)", flush=True)
    model.eval()
    xe, ye = count_data(np.random.default_rng(30_000 + seed), 2000)
    with torch.no_grad():
        soft = model(xe)
    info = {"steps": steps, "batch": batch, "lr": lr, "seed": seed, "train_seconds": round(time.time() - t0, 1),
            "heldout_rounded_accuracy": round(float((soft.round() == ye).float().mean()), 4),
            "heldout_mae": round(float((soft - ye).abs().mean()), 4)}
    print("tiny-count held-out (0-6 objects, half degraded):", info, flush=True)
    save_count(model, out, info)
    return info


def save_count(model, out: str, info: dict) -> None:
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**model.config, "recipe": "python -m bench.tinyworld.train_rewards tiny-count", **info}, f,
                      indent=2)


# ---------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train one of the tiny world's reward models.")
    p.add_argument("model", choices=["tiny-clip", "tiny-aesthetic", "tiny-count"])
    p.add_argument("--out", help="output folder (default models/<model>)")
    p.add_argument("--clip", default="models/tiny-clip", help="tiny-aesthetic: the CLIP folder it sits on")
    p.add_argument("--steps", type=int, help="optimizer steps (tiny-clip, tiny-count) or epochs (tiny-aesthetic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = a.out or os.path.join("models", a.model)
    kw = {"seed": a.seed}
    if a.model == "tiny-clip":
        train_clip(out, **kw, **({"steps": a.steps} if a.steps else {}))
    elif a.model == "tiny-aesthetic":
        train_aesthetic(out, a.clip, **kw, **({"epochs": a.steps} if a.steps else {}))
    else:
        train_count(out, **kw, **({"steps": a.steps} if a.steps else {}))


if __name__ == "__main__":
    main()
