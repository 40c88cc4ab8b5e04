"""Recipe: pretrain the tiny world's base text-to-image model (``make base-model``).

Trains the UNet and the text encoder jointly on freshly rendered tiny-world images with the standard
epsilon-prediction denoising loss:

    x0 ~ world, c = caption (replaced by "" with probability ``caption_dropout``, for CFG),
    t ~ U{0..999}, eps ~ N(0, I), x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,
    loss = w(t) * || eps_theta(x_t, t, c) - eps ||^2,  w(t) = 1 (the "simple" loss), or
                                                        min(SNR(t), gamma) / SNR(t) with --min-snr-gamma

or, with ``--objective flow`` (the tiny flow world, ``make flow-model``), rectified flow's velocity loss (Liu et al.,
arXiv 2209.03003; Esser et al., arXiv 2403.03206, whose logit-normal time sampling it uses: their best
"rf/lognorm(0, 1)"):

    s = sigmoid(n), n ~ N(0, 1),  x_s = (1 - s) x0 + s eps,  loss = || v_theta(x_s, 1000 s, c) - (eps - x0) ||^2

(the UNet sees the time as 1000 s, as diffusers' FlowMatchEulerDiscreteScheduler hands it to the model), with AdamW,
linear warm-up then cosine decay, gradient clipping and an EMA of the weights (the EMA
is what gets saved).  Runs on CPU or GPU (``--device``); it checkpoints every ``--save-every`` steps
into ``<out>.state.pt`` and continues from there when restarted with the same arguments.

    python -m bench.tinyworld.pretrain --out models/tiny-t2i --steps 3000
    python -m bench.tinyworld.pretrain --out models/tiny-flow --steps 3000 --objective flow
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from bench.tinyworld import models as tiny_models
from diffalign import world
from diffalign.store import atomic_write_with


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/tiny-t2i")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--min-snr-gamma", type=float, default=0.0,
                   help="min-SNR weighting (0 = off; it starves the low-noise steps that clean up samples)")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--stop-at", type=int, default=0,
                   help="stop after this step, saved (a piece of a long recipe: rerun to continue; 0 = --steps)")
    p.add_argument("--objective", choices=tiny_models.OBJECTIVES, default="eps",
                   help="eps: the DDPM world (epsilon loss); flow: the rectified-flow world (velocity loss)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    flow = a.objective == "flow"
    comps = tiny_models.build_components(seed=a.seed, objective=a.objective)
    unet, text_encoder, tokenizer, scheduler = (comps[k] for k in ("unet", "text_encoder", "tokenizer", "scheduler"))
    unet.to(device).train()
    text_encoder.to(device).train()
    ema = {"unet": copy.deepcopy(unet).eval(), "text_encoder": copy.deepcopy(text_encoder).eval()}
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / a.warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / a.steps)))))
    abar = None if flow else scheduler.alphas_cumprod.to(device)
    rng = np.random.default_rng(a.seed)
    gen = torch.Generator().manual_seed(a.seed)
    state_path = a.out.rstrip("/") + ".state.pt"
    step, losses = 0, []
    if os.path.exists(state_path):
        st = torch.load(state_path, map_location=device, weights_only=False)
        unet.load_state_dict(st["unet"])
        text_encoder.load_state_dict(st["text_encoder"])
        ema["unet"].load_state_dict(st["ema_unet"])
        ema["text_encoder"].load_state_dict(st["ema_text_encoder"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        rng.bit_generator.state = st["rng"]
        gen.set_state(st["gen"])
        step, losses = st["step"], st["losses"]
        print(f"resumed from {state_path} at step {step}")

    def save() -> None:
        atomic_write_with(state_path, lambda b: torch.save({
            "unet": unet.state_dict(), "text_encoder": text_encoder.state_dict(),
            "ema_unet": ema["unet"].state_dict(), "ema_text_encoder": ema["text_encoder"].state_dict(),
            "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng.bit_generator.state,
            "gen": gen.get_state(), "step": step, "losses": losses, "args": vars(a)}, b))
        out = {"unet": ema["unet"], "text_encoder": ema["text_encoder"], "tokenizer": tokenizer,
               "scheduler": scheduler}
        tiny_models.save_pipeline(out, a.out)

    t0 = time.time()
    stop = min(a.steps, a.stop_at) if a.stop_at > 0 else a.steps
    while step < stop:
        images, scenes = world.batch(rng, a.batch)
        x0 = torch.from_numpy(images).to(device) * 2 - 1
        captions = [s.caption if rng.random() >= a.caption_dropout else "" for s in scenes]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        if flow:  # rectified flow: logit-normal time, the straight path, the velocity target
            s = torch.sigmoid(torch.randn((a.batch,), generator=gen)).to(device)
            eps = torch.randn(x0.shape, generator=gen).to(device)
            xt = (1 - s).view(-1, 1, 1, 1) * x0 + s.view(-1, 1, 1, 1) * eps
            pred = unet(xt, s * scheduler.config.num_train_timesteps, encoder_hidden_states=text_encoder(ids)[0]).sample
            loss = F.mse_loss(pred, eps - x0)
        else:
            t = torch.randint(0, len(abar), (a.batch,), generator=gen).to(device)
            eps = torch.randn(x0.shape, generator=gen).to(device)
            ab = abar[t].view(-1, 1, 1, 1)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            pred = unet(xt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
            snr = abar[t] / (1 - abar[t])
            weight = torch.clamp(snr, max=a.min_snr_gamma) / snr if a.min_snr_gamma > 0 else torch.ones_like(snr)
            loss = (weight * F.mse_loss(pred, eps, reduction="none").mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        step += 1
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, live in (("unet", unet), ("text_encoder", text_encoder)):
                for pe, pl in zip(ema[name].parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        losses.append(float(loss.detach()))
        if step % 25 == 0:
            print(f"step {step}/{a.steps} loss {np.mean(losses[-25:]):.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        if step % a.save_every == 0 or step == stop:
            save()
    if step < a.steps:
        print(f"stopped at step {step} of {a.steps} (--stop-at), saved to {state_path}: rerun to continue")
        return
    print(f"done: {step} steps, final loss {np.mean(losses[-50:]):.4f}, saved to {a.out}")


if __name__ == "__main__":
    main()
