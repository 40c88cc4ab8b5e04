"""The peer side of `make peers`: trl 0.23.1's AlignPropTrainer and DDPOTrainer (the last release that has them), run in
their own environment (.peers-venv: transformers 4.x, no torchvision), on the same small random-weight latent SD folder
and the same work as ours (parity/peers.py states it), and trl's DDIM step log-prob on inputs our side wrote.

    python parity/peers_trl.py alignprop|ddpo --model DIR --prompts FILE --steps N      # one JSON line
    python parity/peers_trl.py logprob --inputs FILE                                    # one JSON line

Timing: one untimed warm-up step, then ``--steps`` steps, each timed alone (``trainer.step``: AlignProp's sampling
with gradients, reward, backward and update; DDPO's sampling of the epoch and its training), on 1 thread.  Memory:
the process's peak resident set (``ru_maxrss``), as ours is read.  This file imports nothing from the project.
"""
import argparse
import json
import random
import resource
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def saturation(images: torch.Tensor) -> torch.Tensor:
    """rewards/pixel.py's Saturation, written out here (images in [0, 1])."""
    x = images.float()
    return (x.amax(dim=1) - x.amin(dim=1)).flatten(1).mean(1)


def prompt_fn(path: str):
    prompts = [p.strip() for p in open(path) if p.strip()]
    rng = random.Random(0)
    return lambda: (rng.choice(prompts), {})


def sd_folder(model: str) -> str:
    """The folder as StableDiffusionPipeline of trl's era reads it: a copy whose index names that class (no safety
    checker) and whose word-level tokenizer (saved by transformers 5 as ``TokenizersBackend``) is read as
    ``PreTrainedTokenizerFast`` (the same tokenizer.json)."""
    import os
    import shutil
    import tempfile

    out = os.path.join(tempfile.mkdtemp(prefix="peers-sd-"), "model")
    shutil.copytree(model, out)
    index = json.load(open(os.path.join(out, "model_index.json")))
    index.update(_class_name="StableDiffusionPipeline", tokenizer=["transformers", "PreTrainedTokenizerFast"],
                 safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    json.dump(index, open(os.path.join(out, "model_index.json"), "w"))
    tok = os.path.join(out, "tokenizer", "tokenizer_config.json")
    cfg = json.load(open(tok))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    json.dump(cfg, open(tok, "w"))
    return out


def pipeline(model: str):
    import accelerate
    from trl import DefaultDDPOStableDiffusionPipeline

    accelerate.PartialState()  # the pipeline's LoRA set-up needs one (trl 0.23.1, a local folder without LoRA)
    return DefaultDDPOStableDiffusionPipeline(sd_folder(model), use_lora=True)


def timed(step, steps: int) -> list[float]:
    step(0)  # warm-up
    out = []
    for i in range(1, steps + 1):
        t0 = time.perf_counter()
        step(i)
        out.append(time.perf_counter() - t0)
    return out


def alignprop(a) -> dict:
    from trl import AlignPropConfig, AlignPropTrainer

    cfg = AlignPropConfig(num_epochs=a.steps + 1, save_freq=10 ** 9, sample_num_steps=10, sample_eta=0.0,
                          sample_guidance_scale=3.0, train_batch_size=8, train_gradient_accumulation_steps=1,
                          train_learning_rate=1e-3, train_max_grad_norm=5.0, truncated_backprop_rand=False,
                          truncated_backprop_timestep=8, mixed_precision="no", log_with=None)
    trainer = AlignPropTrainer(cfg, lambda images, prompts, meta: (saturation(images), {}), prompt_fn(a.prompts),
                               pipeline(a.model))
    return {"step_s": timed(lambda i: trainer.step(i, i), a.steps)}


def ddpo(a) -> dict:
    from trl import DDPOConfig, DDPOTrainer

    cfg = DDPOConfig(num_epochs=a.steps + 1, save_freq=10 ** 9, sample_num_steps=10, sample_eta=1.0,
                     sample_guidance_scale=3.0, sample_batch_size=8, sample_num_batches_per_epoch=2,
                     train_batch_size=4, train_gradient_accumulation_steps=2, train_num_inner_epochs=1,
                     train_timestep_fraction=1.0, train_learning_rate=3e-3, train_cfg=True,
                     per_prompt_stat_tracking=True, per_prompt_stat_tracking_buffer_size=16,
                     per_prompt_stat_tracking_min_count=16, async_reward_computation=False, mixed_precision="no",
                     log_with=None)
    trainer = DDPOTrainer(cfg, lambda images, prompts, meta: (saturation(images), {}), prompt_fn(a.prompts),
                          pipeline(a.model))
    return {"step_s": timed(lambda i: trainer.step(i, i), a.steps)}


def logprob(a) -> dict:
    """trl's ``scheduler_step`` log-prob against ours on the same inputs (parity/peers.py writes them)."""
    from diffusers import DDIMScheduler
    from trl.models.modeling_sd_base import scheduler_step

    d = torch.load(a.inputs)
    sched = DDIMScheduler.from_config(d["scheduler"])
    out = {}
    for eta, cases in d["cases"].items():
        sched.set_timesteps(d["num_steps"])
        worst = 0.0
        for c in cases:
            r = scheduler_step(sched, c["model_output"], torch.tensor(c["t"]), c["x_t"], eta=float(eta),
                               prev_sample=c["prev"])
            worst = max(worst, float((r.log_probs.double() - c["ours"]).abs().max()))
        out[f"eta{eta}"] = worst
    return {"max_abs_diff": out}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["alignprop", "ddpo", "logprob"])
    p.add_argument("--model")
    p.add_argument("--prompts")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--inputs")
    a = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    result = {"alignprop": alignprop, "ddpo": ddpo, "logprob": logprob}[a.what](a)
    if "step_s" in result:
        result["median_step_s"] = statistics.median(result["step_s"])
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import trl

    result["trl"] = trl.__version__
    print(json.dumps(result))


if __name__ == "__main__":
    main()
