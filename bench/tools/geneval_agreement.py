"""The GenEval judge against the held-out judge on a base model's samples (not renders).

    python -m bench.tools.geneval_agreement --model models/tiny-t2i --json docs/geneval_agreement.json

Samples every caption of the grammar (96: 48 without position, 48 with one) with ``--seeds`` fixed seeds and
the eval sampler (deterministic, 10 steps, CFG 3, as ``make base-quality``), then reports per attribute how
often the two judges read the same class (colour and shape on the images both judges see an object in, count
on all), each judge's fidelity to the prompt, and ``tiny-geneval`` (the rule, with position where asked) beside
the held-out judge's all-three fidelity.  Renders have ground truth and both judges read them almost perfectly
(``models/tiny-geneval-judge/config.json``); samples have none, so where the judges disagree only a look at
the images (``--grid``) can tell which one is right.
"""
from __future__ import annotations

import argparse
import json
import math

import numpy as np
import torch

from bench.outputs.plots import save_grid
from bench.tinyworld.judge import load_judge
from diffalign import world
from diffalign.pipeline import load_pipeline
from diffalign.sampling import initial_noise, sample
from diffalign.store import atomic_write_json, project_path
from rewards.geneval import COLOURS, SHAPES, TinyGenEval


def _mean_se(v: np.ndarray) -> dict:
    v = np.asarray(v, dtype=np.float64)
    return {"mean": round(float(v.mean()), 4), "se": round(float(v.std(ddof=1) / math.sqrt(len(v))), 4),
            "n": int(len(v))}


def measure(model: str, seeds: int = 2, num_steps: int = 10, guidance: float = 3.0, grid: str | None = None) -> dict:
    pipe = load_pipeline(project_path(model))
    judge, reward = load_judge(project_path("models/tiny-judge")), TinyGenEval()
    captions = world.all_captions()
    noise = torch.cat([initial_noise(pipe, 1, torch.Generator().manual_seed(1000 + s)) for s in range(seeds)])
    images, prompts = [], []
    with torch.no_grad():
        for c in captions:
            images.append(sample(pipe, [c] * seeds, noise, num_steps, guidance, 0.0).images.float())
            prompts += [c] * seeds
        images = torch.cat(images).clamp(0, 1)
        held = judge.read(images)
        probs = reward.probabilities(images)
    ours = {k: v.argmax(-1).cpu() for k, v in probs.items() if k != "position"}
    seen = (held["count"] >= 1) & (ours["count"] >= 1)
    agree = {k: (held[k] == ours[k]).numpy() for k in ("colour", "shape", "count")}
    fid = judge.fidelity(images, prompts)
    parts = reward.attributes(images, prompts)
    asked = parts["position_asked"].bool().numpy()
    out = {"model": model, "samples": len(prompts), "sampler": {"num_steps": num_steps, "guidance": guidance,
                                                                 "eta": 0.0, "seeds": f"1000..{999 + seeds}"},
           "agreement": {"colour": _mean_se(agree["colour"][seen.numpy()]),
                         "shape": _mean_se(agree["shape"][seen.numpy()]), "count": _mean_se(agree["count"]),
                         "all": _mean_se((agree["colour"] & agree["shape"] & agree["count"])[seen.numpy()])},
           "heldout_judge_fidelity": {k: _mean_se(v) for k, v in fid.items()},
           "tiny_geneval": {k: _mean_se(parts[k].numpy()) for k in ("shape", "colour", "count")},
           "tiny_geneval_position_where_asked": _mean_se(parts["position"].numpy()[asked]),
           "tiny_geneval_rule": _mean_se(parts["all"].numpy()),
           "tiny_geneval_rule_without_position_captions": _mean_se(parts["all"].numpy()[~asked]),
           "heldout_fidelity_without_position_captions": _mean_se(fid["all"][~asked])}
    if grid:
        bad = [i for i in range(len(prompts)) if not (agree["shape"][i] and agree["count"][i] and agree["colour"][i])]
        bad = bad[:48]
        labels = [f"{prompts[i]} | held-out: {COLOURS[held['colour'][i]]} {SHAPES[held['shape'][i]]} "
                  f"{int(held['count'][i])} | geneval: {COLOURS[ours['colour'][i]]} {SHAPES[ours['shape'][i]]} "
                  f"{int(ours['count'][i])}" for i in bad]
        out["disagreements"] = labels
        if bad:
            save_grid(images[bad], labels, 1, grid, title="judges disagree")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="models/tiny-t2i")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--grid")
    p.add_argument("--json")
    a = p.parse_args(argv)
    out = measure(a.model, a.seeds, grid=a.grid)
    print(json.dumps(out, indent=1))
    if a.json:
        atomic_write_json(a.json, out)


if __name__ == "__main__":
    main()
