"""Where is the policy-gradient signal?  ``python -m bench.tools.pg_diagnostics --reward tiny-aesthetic``

For the guided DDIM sampler at eta = 1 (the DDPO / DPOK policy) with a fresh LoRA adapter, this measures, per
denoising step k (sampling order, 0 = the step from pure noise):

* ``sigma``: the step's noise scale;
* ``grad_norm``: the mean norm of one sample's likelihood-ratio term  A_i * grad log p(x_{k+1} | x_k)  (summed
  log-density, A = the batch-centred reward), the term DDPO averages;
* ``along_mean`` / ``along_se``: that term projected on the direction u of a pathwise gradient (the reward
  backpropagated through the whole chain with the same sampler, reparameterised: an independent estimate of
  grad E[R]), its mean and standard error over the samples.  A step whose ``along_se`` is large against
  ``along_mean`` costs many samples before it says anything.

It also reports the cosine between two independent halves of the pathwise gradient (how noisy that reference
direction itself is) and the same projection for the sum over all steps, all but the last, and the interior
steps.  Results go to stdout and, with ``--out``, to a JSON file (the README's table is one such file,
``docs/pg_diagnostics.json``).  Slow on purpose (one backward pass per sample and step): ~7 minutes at 1 thread.
"""
from __future__ import annotations

import argparse
import json

import torch

from diffalign import process
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from diffalign.sampling import guided_eps, initial_noise, sample, sample_with_grad
from diffalign.store import atomic_write_text
from prompts import load_prompts
from rewards import get_reward


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="bench.tools.pg_diagnostics")
    p.add_argument("--model", default="models/tiny-t2i")
    p.add_argument("--reward", default="tiny-aesthetic")
    p.add_argument("--prompts", default="tiny-train")
    p.add_argument("--samples", type=int, default=48, help="likelihood-ratio samples")
    p.add_argument("--pathwise", type=int, default=64, help="pathwise-gradient samples (two halves)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    params = add_lora(pipe.unet)
    reward, prompts = get_reward(a.reward), load_prompts(a.prompts)
    if not reward.differentiable:
        raise SystemExit(f"error: reward {a.reward!r} is not differentiable; the pathwise reference needs one")

    def flat(grads):
        return torch.cat([(torch.zeros_like(q) if g is None else g).flatten() for q, g in zip(params, grads)])

    def noise(seeds):
        return torch.cat([initial_noise(pipe, 1, torch.Generator().manual_seed(s)) for s in seeds])

    halves = []
    per_half, bs = a.pathwise // 2, 8
    for h in range(2):
        g = 0
        for b in range(0, per_half, bs):
            seeds = [10_000 + h * per_half + b + i for i in range(bs)]
            pr = [prompts[s * 7 % len(prompts)] for s in seeds]
            img = sample_with_grad(pipe, pr, noise(seeds), a.steps, a.guidance, 1.0,
                                   generator=torch.Generator().manual_seed(seeds[0]))
            g = g + flat(torch.autograd.grad(reward(img, pr).mean(), params, allow_unused=True)) * bs / per_half
        halves.append(g)
    cos = float(torch.nn.functional.cosine_similarity(halves[0], halves[1], 0))
    ref = (halves[0] + halves[1]) / 2
    u = ref / ref.norm()

    n = a.samples
    pr = [prompts[i * 5 % len(prompts)] for i in range(n)]
    with torch.no_grad():
        tr = sample(pipe, pr, noise(range(n)), a.steps, a.guidance, 1.0, generator=torch.Generator().manual_seed(0))
    r = reward(tr.images.float(), pr).float().detach()
    adv = r - r.mean()
    along, norms = torch.zeros(a.steps, n), torch.zeros(a.steps, n)
    rows = []
    for k in range(a.steps):
        t = tr.timesteps[k]
        for i in range(n):
            x_t, x_prev = tr.latents[i:i + 1, k], tr.latents[i:i + 1, k + 1]
            unc = tr.uncond[i:i + 1] if tr.uncond is not None else None
            eps = guided_eps(pipe.unet, x_t, t, tr.cond[i:i + 1], unc, a.guidance, None, with_grad=True)
            out = process.step(pipe.scheduler, eps, t, x_t, a.steps, 1.0, prev=x_prev, reduction="sum")
            gi = flat(torch.autograd.grad(out.log_prob.sum(), params, allow_unused=True)) * adv[i]
            along[k, i], norms[k, i] = gi @ u, gi.norm()
        rows.append({"step": k, "timestep": int(t), "sigma": float(out.std.reshape(-1)[0]),
                     "grad_norm": float(norms[k].mean()), "along_mean": float(along[k].mean()),
                     "along_se": float(along[k].std() / n ** 0.5)})
        print(rows[-1], flush=True)
    sums = {}
    for name, sl in (("all", slice(0, a.steps)), ("all_but_last", slice(0, a.steps - 1)),
                     ("interior", slice(1, a.steps - 1))):
        s = along[sl].sum(0)
        sums[name] = {"along_mean": float(s.mean()), "along_se": float(s.std() / n ** 0.5)}
    result = {"reward": a.reward, "samples": n, "pathwise_samples": a.pathwise, "pathwise_halves_cosine": cos,
              "pathwise_norm": float(ref.norm()), "per_step": rows, "sums": sums}
    print(json.dumps({k: v for k, v in result.items() if k != "per_step"}, indent=1))
    if a.out:
        atomic_write_text(a.out, json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
