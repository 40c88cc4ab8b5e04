"""Time one evaluation of the tiny world (AlignProp's config, 8 eval seeds = 64 images, a 2-seed KL, the tiny-v2
protocol's five metrics) with a perturbed LoRA, three times after a warm-up:

    python -m bench.tools.eval_time --threads 1

docs/cost.md quotes what it printed (the per-prompt sampler calls against calls batched over prompts)."""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from bench.core.config import resolve
    from bench.core.evaluate import Evaluator
    from diffalign.lora import add_lora
    from diffalign.pipeline import RUN_MEMORY_FORMAT, load_pipeline
    from rewards import get_reward

    cfg = resolve("alignprop", ["eval.num_seeds=8", "eval.kl_seeds=2",
                                "eval.metrics=[tiny-aesthetic, saturation, tiny-count, tiny-rating, tiny-clip]"])
    pipe = load_pipeline(cfg.model, memory_format=RUN_MEMORY_FORMAT)
    add_lora(pipe.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.init, seed=0)
    ev = Evaluator(cfg, get_reward(cfg.reward))
    ev(pipe, 1)  # warm-up
    times = []
    for i in range(args.repeats):
        t = time.perf_counter()
        ev(pipe, 2 + i)
        times.append(time.perf_counter() - t)
    print(f"{args.threads} thread(s): one evaluation {', '.join(f'{x:.2f}' for x in times)} s")


if __name__ == "__main__":
    main()
