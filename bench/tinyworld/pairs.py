"""The tiny world's offline preference pairs (``make tiny-pairs``): base-model samples ranked by the hidden rating.

    python -m bench.tinyworld.pairs --out models/tiny-pairs [--per-prompt 4] [--seed 0]

Every train prompt (``tiny-train``, 88 captions) is sampled ``--per-prompt`` times by the committed base model with
the deterministic sampler (DDIM, eta = 0, 10 steps, CFG 3; the initial noise of sample i from seed
``seed * 100003 + i``), each sample is scored by the hidden rating (``tiny-rating``, ``diffalign.world``'s ground
truth, 0-10), and every pair of one prompt's samples whose ratings differ by more than ``--tie`` becomes a
(winner, loser) pair.  Deterministic: the same arguments give the same pairs, byte for byte.  Written as a
Pick-a-Pic-style ``pairs.parquet`` (caption, jpg_0 = winner, jpg_1 = loser as PNG, label_0 = 1), read by
``diffalign.preference.load_pairs`` like any user's pair file, plus ``config.json`` (the recipe and counts).
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from diffalign.pipeline import load_pipeline
from diffalign.preference import pairs_from_groups, save_pairs
from diffalign.sampling import initial_noise, sample
from diffalign.store import atomic_dir, project_path
from prompts import load_prompts
from rewards import get_reward

LABELLER = "tiny-rating"


def build(model: str, prompt_set: str, per_prompt: int, seed: int, tie: float, num_steps: int = 10,
          guidance: float = 3.0, batch: int = 32):
    pipe = load_pipeline(project_path(model))
    rating = get_reward(LABELLER)
    prompts = [p for p in load_prompts(prompt_set) for _ in range(per_prompt)]
    images, scores = [], []
    for b in range(0, len(prompts), batch):
        chunk = prompts[b:b + batch]
        noise = torch.cat([initial_noise(pipe, 1, torch.Generator().manual_seed(seed * 100003 + b + i))
                           for i in range(len(chunk))])
        traj = sample(pipe, chunk, noise, num_steps, guidance, eta=0.0)
        images.append(traj.images.float())
        scores.append(rating(traj.images, chunk))
    meta = {"labelled_by": LABELLER, "recipe": "python -m bench.tinyworld.pairs", "model": model,
            "prompts": prompt_set, "per_prompt": per_prompt, "seed": seed, "tie": tie,
            "sampler": {"num_steps": num_steps, "guidance": guidance, "eta": 0.0}}
    pairs = pairs_from_groups(prompts, torch.cat(images), torch.cat(scores), per_prompt, tie, meta)
    meta.update(samples=len(prompts), pairs=len(pairs))
    return pairs, meta


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.tinyworld.pairs", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="models/tiny-pairs")
    p.add_argument("--model", default="models/tiny-t2i")
    p.add_argument("--prompts", default="tiny-train")
    p.add_argument("--per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tie", type=float, default=0.1, help="rating gap at or below which a pair is a tie (dropped)")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pairs, meta = build(a.model, a.prompts, a.per_prompt, a.seed, a.tie)
    with atomic_dir(a.out) as tmp:
        save_pairs(pairs, os.path.join(tmp, "pairs.parquet"))
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
    print(f"{meta['pairs']} pairs from {meta['samples']} samples -> {a.out}")


if __name__ == "__main__":
    main()
