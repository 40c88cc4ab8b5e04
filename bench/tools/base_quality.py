"""Base-model quality in the tiny world: judge fidelity on fixed seeds (``make base-quality``).

Samples every count/colour/shape caption of the grammar (48, no position words) with ``--seeds``
fixed seeds, with the eval sampler (deterministic DDIM, CFG), and reports the judge's colour, shape,
count and all-three fidelity with standard errors, next to chance.  The README's figures come from
this command; ``--grid`` also saves a sample grid.
"""
from __future__ import annotations

import argparse
import math

import torch

from bench.outputs.plots import save_grid
from bench.tinyworld.judge import load_judge
from diffalign import world
from diffalign.pipeline import load_pipeline
from diffalign.sampling import initial_noise, sample
from diffalign.store import atomic_write_json, project_path


def measure(model: str, judge_path: str, seeds: int = 4, num_steps: int = 10, guidance: float = 3.0,
            grid: str | None = None) -> dict:
    pipe = load_pipeline(project_path(model))
    judge = load_judge(project_path(judge_path))
    captions = [c for c in world.all_captions() if " on the " not in c]
    noise = torch.cat([initial_noise(pipe, 1, torch.Generator().manual_seed(1000 + s)) for s in range(seeds)])
    images, prompts = [], []
    for c in captions:
        images.append(sample(pipe, [c] * seeds, noise, num_steps, guidance, 0.0).images)
        prompts += [c] * seeds
    images = torch.cat(images)
    fid = judge.fidelity(images, prompts)
    n = len(prompts)
    out = {k: {"mean": float(v.mean()), "se": float(v.std(ddof=1) / math.sqrt(n))} for k, v in fid.items()}
    out["chance"] = {"colour": 1 / len(world.COLOURS), "shape": 1 / len(world.SHAPES),
                     "count": 1 / len(world.COUNT_WORDS)}
    out["samples"] = n
    out["sampler"] = {"num_steps": num_steps, "guidance": guidance, "eta": 0.0, "seeds": f"1000..{999 + seeds}"}
    if grid:
        pick = [i for i, c in enumerate(prompts) if c.split()[1] in ("red", "blue")][: 12 * seeds]
        save_grid(images[pick], [prompts[i] for i in pick], seeds, grid, title=f"{model}: base model samples")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="models/tiny-t2i")
    p.add_argument("--judge", default="models/tiny-judge")
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--num-steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--grid")
    p.add_argument("--json")
    a = p.parse_args(argv)
    out = measure(a.model, a.judge, a.seeds, a.num_steps, a.guidance, a.grid)
    for k in ("colour", "shape", "count", "all"):
        print(f"{k:7s} fidelity {out[k]['mean']:.3f} ± {out[k]['se']:.3f}"
              + (f"   (chance {out['chance'][k]:.3f})" if k in out["chance"] else ""))
    if a.json:
        atomic_write_json(a.json, out)


if __name__ == "__main__":
    main()
