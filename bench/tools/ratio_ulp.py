"""What one unit in the last place of the model output does to the first inner step's importance ratios, on the CPU.

``python -m bench.tools.ratio_ulp [--out docs/ratio_ulp.json]`` (about a minute on 2 cores)

On the CPU a UNet call gives the same bits at any batch size, so DDPO's and DPOK's recomputed log-probs equal the
sampled ones and ``ratio_dev_first`` (max |rho - 1| at the first inner step, before any update) is 0.  A GPU may pick
another kernel for the training batch than for the sampling batch and differ by a unit in the last place.  This
measures what that would do: for DDPO-IS and DPOK at their smoke settings on the tiny world, one step from the same
state (seed 0) in float32, bf16 and fp16, once as is and once with every element of the recomputation's UNet output
(the calls made with gradients) moved one unit in the last place up (``torch.nextafter``).  Per row:
``ratio_dev_first``, the mean ratio over the step's training phase, and the KL to the base model after the step
(``kl_to_base`` on 4 training prompts, one trajectory each, nats summed over steps and latent elements).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch

from bench.core import run
from bench.core.config import resolve, short_overrides
from diffalign.sampling import kl_to_base
from diffalign.store import RunFolder, atomic_write_text

METHODS = ("ddpo", "dpok")
PRECISIONS = ("no", "bf16", "fp16")


def nudged(unet) -> None:
    """The UNet's output one unit in the last place up whenever gradients are on (the training phase's calls)."""
    forward = unet.forward

    def one_ulp_up(*args, **kwargs):
        out = forward(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        o = out[0]
        up = torch.nextafter(o.detach(), torch.full_like(o.detach(), float("inf")))
        return (o + (up - o.detach()), *out[1:])
    unet.forward = one_ulp_up


def measure(method: str, precision: str, nudge: bool, tmp: str) -> dict:
    sets = ["threads=2"] + ([f"mixed_precision={precision}"] if precision != "no" else [])
    r = run.Run(resolve(method, short_overrides(method, sets)), RunFolder(os.path.join(tmp, f"{method}-{precision}")))
    if nudge:
        nudged(r.ctx.pipe.unet)
    r.ctx.step = 1
    with r.ctx.accelerator.autocast():
        metrics = r.method.step()
    s, g = r.cfg.sampler, torch.Generator().manual_seed(1)
    prompts = r.ctx.train_prompts[:4]
    x_T = torch.randn((len(prompts), *r.ctx.pipe.latent_shape), generator=g).to(r.ctx.pipe.device, r.ctx.pipe.dtype)
    kl = kl_to_base(r.ctx.pipe, prompts, x_T, s.num_steps, s.guidance, s.eta, g)
    return {"method": method, "precision": precision, "nudged": nudge, "ratio_dev_first": metrics["ratio_dev_first"],
            "ratio_mean": metrics["ratio_mean"], "kl_to_base": float(kl.mean()), "variant": r.cfg.variant}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="a JSON file for the rows")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ratio-ulp-") as tmp:
        for method in METHODS:
            for precision in PRECISIONS:
                for nudge in (False, True):
                    rows.append(measure(method, precision, nudge, tmp))
                    r = rows[-1]
                    print(f"{method:5s} {precision:4s} {'one ulp up' if nudge else 'as is':10s} "
                          f"ratio_dev_first {r['ratio_dev_first']:.1e}  ratio_mean {r['ratio_mean']:.7f}  "
                          f"kl_to_base {r['kl_to_base']:.1f}", flush=True)
    if a.out:
        atomic_write_text(a.out, json.dumps({"command": "python -m bench.tools.ratio_ulp --out " + a.out,
                                             "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
