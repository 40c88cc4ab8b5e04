"""The recipe for the GenEval judge (``make geneval-judge``), the detector of the ``tiny-geneval`` reward.

    python -m bench.tinyworld.geneval_judge --out models/tiny-geneval-judge --threads 1

GenEval (Ghosh, Hajishirzi, Schmidt, arXiv 2310.11513) judges a generated image with an object detector
and scores it 1 only when everything the prompt asks for is there.  This recipe trains the tiny world's
detector for that rule: :class:`rewards.geneval.GenevalNet` (a residual CNN with GroupNorm and coordinate
channels) reading colour, shape, count 0-4 and position (left / right / top / bottom of a single
object's centre, :func:`rewards.geneval.in_region`).  It is trained by the project's recipe for a judge
(renders of :mod:`diffalign.world` with corruptions, cross-entropy, AdamW + one-cycle), but independently
of the held-out judge (``bench/tinyworld/judge.py``): another seed (1, not 0), another architecture, more
positioned scenes (``position_prob`` 0.5), and its own corruption mix (:func:`corrupted_batch`: blank
images labelled count 0, contrast, a 3x3 or 5x5 blur, a grey background tint, Gaussian noise).

After training it measures, on held-out renders drawn from seeds training never uses, each attribute's
accuracy on clean and on corrupted renders, the rule's accuracy (every attribute of each render's own
caption read right), and the agreement with the held-out judge on colour, shape and count on the same
images; all of it goes into ``config.json`` beside ``model.safetensors`` (written atomically).
Deterministic for a given ``--seed`` and thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffalign import world
from diffalign.store import atomic_dir
from rewards.geneval import COLOURS, MAX_COUNT, REGIONS, SHAPES, GenevalNet, in_region

EVAL_SEEDS = {"clean": 231_011, "corrupted": 231_012}   # held-out renders (training draws from --seed only)
POSITION_PROB = 0.5


def labels_of(scenes: list[world.Scene]) -> dict[str, torch.Tensor]:
    """Targets per scene: colour, shape, count, the four region bits and whether position is defined (one
    object: its centre's regions; no object: all off; several objects: undefined, not trained), and the
    caption's position (``asked_position``: its index in REGIONS, -1 for none)."""
    pos = torch.tensor([[in_region(r, *s.objects[0][:2]) if s.count == 1 else False for r in REGIONS]
                        for s in scenes], dtype=torch.float32)
    return {"colour": torch.tensor([COLOURS.index(s.colour) for s in scenes]),
            "shape": torch.tensor([SHAPES.index(s.shape) for s in scenes]),
            "count": torch.tensor([s.count for s in scenes]),
            "position": pos, "position_defined": torch.tensor([s.count == 1 for s in scenes]),
            "asked_position": torch.tensor([REGIONS.index(s.position) if s.position else -1 for s in scenes])}


def _blur(x: torch.Tensor, taps: list[float]) -> torch.Tensor:
    k = torch.tensor(taps) / sum(taps)
    k2 = (k[:, None] * k[None, :]).expand(3, 1, len(taps), len(taps)).contiguous()
    p = len(taps) // 2
    return F.conv2d(F.pad(x, (p, p, p, p), mode="replicate"), k2, groups=3)


def corrupted_batch(rng: np.random.Generator, n: int, blank_frac: float = 0.08, clean: bool = False):
    """``n`` renders (half of the single objects with a position) with their labels; unless ``clean``, the
    corruptions a sample may show: blank (count 0, 8 %), contrast x U(0.7, 1.15), a 3x3 (20 %) or 5x5 (10 %)
    binomial blur, a grey background tint U(0, 0.15) (25 %), Gaussian noise sigma U(0, 0.12).
    Returns images (n, 3, 32, 32), labels (:func:`labels_of`, with ``blank``)."""
    images, scenes = world.batch(rng, n, position_prob=POSITION_PROB)
    x = torch.from_numpy(images)
    y = labels_of(scenes)
    blank = torch.zeros(n, dtype=torch.bool)
    if not clean:
        blank = torch.from_numpy(rng.random(n) < blank_frac)
        x[blank] = 0.0
        y["count"][blank] = 0
        y["position"][blank] = 0.0
        y["position_defined"] = y["position_defined"] | blank
        x = x * torch.from_numpy(rng.uniform(0.7, 1.15, size=(n, 1, 1, 1)).astype(np.float32))
        u = rng.random(n)
        b3, b5 = torch.from_numpy(u < 0.2), torch.from_numpy((u >= 0.2) & (u < 0.3))
        if b3.any():
            x[b3] = _blur(x[b3], [1, 2, 1])
        if b5.any():
            x[b5] = _blur(x[b5], [1, 4, 6, 4, 1])
        tint = rng.uniform(0.0, 0.15, size=(n, 1, 1, 1)) * (rng.random((n, 1, 1, 1)) < 0.25)
        x = x + torch.from_numpy(tint.astype(np.float32))
        sigma = torch.from_numpy(rng.uniform(0.0, 0.12, size=(n, 1, 1, 1)).astype(np.float32))
        x = (x + sigma * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))).clamp(0, 1)
    y["blank"] = blank
    return x, y


def loss_of(logits: dict[str, torch.Tensor], y: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy on count (all images), colour and shape (images with objects), binary cross-entropy on
    the four region bits (images with one object or none)."""
    keep, pos = ~y["blank"], y["position_defined"]
    loss = F.cross_entropy(logits["count"], y["count"])
    loss = loss + F.cross_entropy(logits["colour"][keep], y["colour"][keep])
    loss = loss + F.cross_entropy(logits["shape"][keep], y["shape"][keep])
    if pos.any():
        loss = loss + F.binary_cross_entropy_with_logits(logits["position"][pos], y["position"][pos])
    return loss


@torch.no_grad()
def read(model: GenevalNet, x: torch.Tensor, chunk: int = 500) -> dict[str, torch.Tensor]:
    """The judge's reading: argmax class per attribute, region bits by logit > 0."""
    outs = [model(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    got = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    return {k: (v > 0) if k == "position" else v.argmax(-1) for k, v in got.items()}


def accuracy(model: GenevalNet, x: torch.Tensor, y: dict[str, torch.Tensor], heldout=None) -> dict[str, float]:
    """Per attribute: colour and shape on images with objects, count on all, position (all four region bits
    right) on single-object images; ``rule``: every attribute of the image's own caption read right (position
    only where the caption names one), on images with objects; with ``heldout`` (the held-out judge) also
    its agreement on colour, shape (images with objects) and count (all), on the same images."""
    got = read(model, x)
    keep = ~y["blank"]
    single = (y["count"] == 1) & keep
    ok = {k: got[k] == y[k] for k in ("colour", "shape", "count")}
    pos_ok = (got["position"] == y["position"].bool()).all(1)
    # the caption's position: the one its scene was drawn with (``asked``), read by the asked region's bit
    a = y["asked_position"]
    asked_ok = torch.where(a >= 0, got["position"].gather(1, a.clamp(min=0)[:, None])[:, 0], torch.ones_like(pos_ok))
    rule = ok["colour"] & ok["shape"] & ok["count"] & asked_ok
    out = {"colour": ok["colour"][keep].float().mean().item(), "shape": ok["shape"][keep].float().mean().item(),
           "count": ok["count"].float().mean().item(), "position": pos_ok[single].float().mean().item(),
           "rule": rule[keep].float().mean().item(), "n": int(len(x)), "n_single": int(single.sum())}
    has = (a >= 0) & keep
    out["asked_position"] = asked_ok[has].float().mean().item()
    out["n_asked_position"] = int(has.sum())
    if heldout is not None:
        with torch.no_grad():
            h = heldout.read(x)
        out["agreement_with_heldout_judge"] = {
            "colour": (h["colour"] == got["colour"])[keep].float().mean().item(),
            "shape": (h["shape"] == got["shape"])[keep].float().mean().item(),
            "count": (h["count"] == got["count"]).float().mean().item(),
            "all": ((h["colour"] == got["colour"]) & (h["shape"] == got["shape"])
                    & (h["count"] == got["count"]))[keep].float().mean().item()}
    r4 = lambda d: {k: (round(v, 4) if isinstance(v, float) else r4(v) if isinstance(v, dict) else v)  # noqa: E731
                    for k, v in d.items()}
    return r4(out)


def heldout_set(kind: str, n: int):
    """``n`` held-out renders (``kind`` clean or corrupted) from a seed training never uses, with labels."""
    return corrupted_batch(np.random.default_rng(EVAL_SEEDS[kind]), n, clean=(kind == "clean"))


def train(steps: int, batch: int = 64, lr: float = 2e-3, seed: int = 1, log_every: int = 100) -> GenevalNet:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = GenevalNet()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for step in range(1, steps + 1):
        x, y = corrupted_batch(rng, batch)
        loss = loss_of(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if log_every and step % log_every == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    return model.eval()


def save(model: GenevalNet, path: str, extra: dict) -> None:
    """``model.safetensors`` + ``config.json`` in ``path``, replaced whole (atomic)."""
    with atomic_dir(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                  os.path.join(tmp, "model.safetensors"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**model.config, "colours": COLOURS, "shapes": SHAPES, "regions": REGIONS,
                       "max_count": MAX_COUNT, **extra}, f, indent=2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Train the GenEval judge of the tiny-geneval reward.")
    p.add_argument("--out", default="models/tiny-geneval-judge")
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--eval-samples", type=int, default=2000, help="held-out renders per set (clean, corrupted)")
    p.add_argument("--heldout-judge", default="models/tiny-judge",
                   help="the held-out judge to measure agreement with ('' to skip)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.time()
    model = train(a.steps, a.batch, a.lr, a.seed)
    train_s = time.time() - t0
    heldout = None
    if a.heldout_judge and os.path.isdir(a.heldout_judge):
        from bench.tinyworld.judge import load_judge  # measurement only: the held-out judge never trains this one
        heldout = load_judge(a.heldout_judge)
    acc = {kind: accuracy(model, *heldout_set(kind, a.eval_samples), heldout=heldout) for kind in EVAL_SEEDS}
    print(json.dumps(acc, indent=1))
    save(model, a.out, {"heldout_accuracy": acc, "steps": a.steps, "batch": a.batch, "lr": a.lr, "seed": a.seed,
                        "threads": torch.get_num_threads(), "train_seconds": round(train_s, 1),
                        "eval_seeds": EVAL_SEEDS})
    print(f"saved {a.out} ({train_s:.0f} s training)")


if __name__ == "__main__":
    main()
