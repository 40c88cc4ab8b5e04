"""OGDM: observation-guided fine-tuning with a noise-level-conditioned discriminator -- variant ``ogdm/adm-ddim``.

Kang, Choi, Choi, Han, "Observation-Guided Diffusion Probabilistic Models", CVPR 2024, arXiv 2310.04041.  The chain
is augmented with observations y ("is this point on the noisy real-data manifold at level t - s?") whose likelihood
is a discriminator; maximising it adds to the denoising loss a term that pushes the model's one-step projection
x_t -> x_{t-s} onto the noisy data manifold, which is what a sampler with few steps relies on.  This is the ADM
(epsilon-prediction, DDIM projection) form, written from the paper and the suite's notes on the authors' code
(read for facts, not copied: its licence is non-commercial).  It takes no reward: it fine-tunes on real captioned
images (``ogdm.data``: the tiny world's renderer by default, a folder or a parquet; ``diffalign/realdata.py``).

    repeat                                                             (one harness step = one G and one D update)
        (x_0, c) ~ real data; c <- "" with probability caption_dropout   (the base model's own CFG recipe)
        t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps
        s ~ U{0..min(floor(k T), t)}                                     (the look-ahead, its own random stream)
        eps_hat = eps_theta(x_t, t, c)                                   (one UNet call, with gradients)
        L_DM = mean ||eps_hat - eps||^2                                  (v-prediction models: their target)
        fake = DDIM(clip(x0_hat(x_t, eps_hat)), eps_hat -> t - s)        (the model's projection, with gradients)
        real = DDIM(x_0, eps(x_t, x_0) -> t - s) = q(x_{t-s} | x_0, eps) (the same noise, no gradients)
        L_G  = L_DM + gamma * l_G(D(fake; t, t - s, c))                  l_G: hinge -D, or logistic softplus(-D)
        theta <- AdamW(theta, clip(grad L_G))                            (LoRA, or every weight: finetune=full)
        L_D  = relu(1 - D(real)) + relu(1 + D(fake.detach())) + r1_weight ||grad_real D(real)||^2
        phi  <- AdamW(phi, grad L_D)                                     (D stepped after G, on the same batch)

The fake is the DDIM step exactly as the sampler takes it, so x0_hat is clipped to the scheduler's range when its
config says ``clip_sample`` (the tiny world's and ADM's samplers do).  Without the clip, at the top of a cosine
schedule (a_t = 2.4e-9 at t = 999) x0_hat amplifies the noise prediction about 20,000-fold, and the adversarial
gradient through those projections dominated and spiked (gradient norm up to 0.77 against a median of 0.004), which
worsened FD on two of three seeds (docs/methods/ogdm.md).

D (``diffalign/adversarial.py``) is a small ResNet on the model's x (pixels, or a latent model's latents),
conditioned by projection on (t, t - s) and on the caption's pooled text embedding (the mean over tokens of the
pipeline's text encoding).  With gamma = 0 nothing adversarial is built or drawn: the run is plain fine-tuning
with the denoising loss (the baseline; tested to give the same weights as a hand-written fine-tuning loop).
``baseline_run: true`` (the preset) makes ``bench run`` also run that baseline, same settings and seed, into the
run folder's ``baseline/`` and write the table of Frechet distance against NFE for base model, baseline and OGDM.
"""
from __future__ import annotations

import math

import torch

from diffalign.adversarial import ADV_LOSSES, Discriminator, discriminator_hinge, generator_loss, r1_penalty
from diffalign.contract import FRACTION, LR, MAX_BATCH, Choice, Flag, Int, Real, Text, rules
from diffalign.images import image_size, images_to_x0
from diffalign.process import add_noise, clips_x0, draw_timesteps, noise_of, project, training_target, x0_and_eps
from diffalign.realdata import load_real_data
from diffalign.sampling import guided_eps

CONFIG_SECTION = "ogdm"
NEEDS_DIFFERENTIABLE_REWARD = False   # no reward in training; the evaluation scores the shared rewards


def data_parallel(cfg, world: int) -> str | None:
    """Several processes: each takes every world-th row of a batch (G's and D's gradients averaged).  Strided, so
    that D's minibatch-std groups (strided over the batch, ``diffalign.adversarial.minibatch_std``) are the same
    samples as in one process, which needs the per-process batch to hold as many groups as the whole one."""
    b = cfg[CONFIG_SECTION]["batch_size"]
    if cfg[CONFIG_SECTION]["gamma"] > 0 and (b % world or math.gcd(b // world, 4) != math.gcd(b, 4)):
        return (f"ogdm.batch_size {b} over {world} processes splits the discriminator's minibatch-std groups of 4; "
                f"accepted: a batch size whose share per process is a multiple of 4 (e.g. {4 * world})")
    return None

DEFAULTS = {
    "data": "tiny-world",        # tiny-world (renders of the train prompts) | a folder or parquet of captioned images
    "batch_size": 32,            # real images per step
    "lr": 1e-3,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "caption_dropout": 0.1,      # the base model's pretraining recipe, so the unconditional branch of CFG is kept
    "gamma": 0.025,              # weight of the adversarial term (ADM fine-tuning: 0.025); 0 = plain fine-tuning
    "k": 0.2,                    # look-ahead: s ~ U{0..min(k T, t)} (ADM: 0.1-0.2)
    "adv_loss": "hinge",         # hinge (-D(fake)) | logistic (softplus(-D(fake)))
    "r1_weight": 0.25,           # R1 on real (ADM: grad_weight / 2 = 0.25)
    "d_lr": 1e-3,
    "d_channels": 32,            # D's base width
    "d_blocks": 3,               # resolution-halving residual blocks (32 -> 4)
    "baseline_run": False,       # also run gamma = 0 into <run>/baseline and compare (the make bench preset)
}
RULES = rules(DEFAULTS, {
    "data": Text(), "caption_dropout": FRACTION, "gamma": Real(0.0, 1e6), "k": FRACTION, "adv_loss": Choice(ADV_LOSSES),
    "r1_weight": Real(0.0, 1e6), "d_lr": LR, "d_channels": Int(1, 4096), "d_blocks": Int(1, 12),
    "baseline_run": Flag(), "batch_size": Int(2, MAX_BATCH)})  # batch >= 2: D's minibatch statistic needs two
SMOKE = {"ogdm": ["ogdm.batch_size=8", "ogdm.baseline_run=false", "ogdm.gamma=0.1"]}


def variant(cfg) -> str:
    d = cfg[CONFIG_SECTION]
    data = d["data"] if d["data"] == "tiny-world" else "file"
    if not d["gamma"]:
        return f"ogdm/adm-ddim/gamma-0(denoising loss only)/data-{data}"
    return (f"ogdm/adm-ddim/gamma-{d['gamma']:g}/k-{d['k']:g}/{d['adv_loss']}/r1-{d['r1_weight']:g}"
            f"/d-resnet(c={d['d_channels']},blocks={d['d_blocks']})/data-{data}")


def validate(cfg) -> None:
    """No key of OGDM's depends on another (each key's range is its rule in RULES)."""


def companion_baseline(cfg) -> list[str] | None:
    """The baseline ``bench run`` adds when ``baseline_run`` is set: the same run with the denoising loss alone."""
    d = cfg[CONFIG_SECTION]
    return ["ogdm.gamma=0", "ogdm.baseline_run=false"] if d["baseline_run"] and d["gamma"] else None


class Method:
    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        c, pipe = self.cfg, ctx.pipe
        self.data = load_real_data(c.data, ctx.train_prompts, image_size(pipe))
        self.opt = ctx.adamw()
        self.adversarial = c.gamma > 0
        self.seen = 0
        if self.adversarial:
            text_dim = pipe.encode_prompts([""]).shape[-1]
            with torch.random.fork_rng(devices=[]):  # D's initial weights from the run's seed, no global side effect
                torch.manual_seed(ctx.cfg.seed)
                self.disc = Discriminator(pipe.unet.config.in_channels, c.d_channels, c.d_blocks, text_dim,
                                          pipe.scheduler.config.num_train_timesteps).to(pipe.device)
            self.d_opt = ctx.guard(torch.optim.AdamW(self.disc.parameters(), lr=c.d_lr, betas=tuple(c.adam_betas),
                                                     eps=c.adam_eps, weight_decay=0.0))
            self.s_gen = torch.Generator().manual_seed(ctx.cfg.seed + 15_485_863)  # the look-ahead's own stream

    def step(self) -> dict:
        ctx, c, pipe = self.ctx, self.cfg, self.ctx.pipe
        sched, T = pipe.scheduler, pipe.scheduler.config.num_train_timesteps
        # 1. real (image, caption) pairs; captions dropped with the pretraining's probability
        captions, images = self.data.draw(c.batch_size, ctx.generator)
        drop = torch.rand(len(captions), generator=ctx.generator) < c.caption_dropout
        captions = ["" if d else p for p, d in zip(captions, drop.tolist())]
        # 2. t, eps and x_t (and the look-ahead's draws: its own stream), for the whole batch; several processes:
        #    each keeps its rows
        n = len(captions)
        t = draw_timesteps(sched, n, ctx.generator)
        eps = torch.randn((n, *pipe.latent_shape), generator=ctx.generator, dtype=torch.float32)
        u = torch.rand(n, generator=self.s_gen) if self.adversarial else None
        captions, images, t, eps = (ctx.local(v, strided=True) for v in (captions, images, t, eps))
        x0 = images_to_x0(pipe, images)
        eps = eps.to(x0)
        x_t = add_noise(sched, x0, t, eps)
        cond = pipe.encode_prompts(captions)
        # 3. the model's prediction and the denoising loss
        out = guided_eps(pipe.unet, x_t, t.to(pipe.device), cond, None, 1.0, ctx.costs, with_grad=True)
        loss_dm = (out.float() - training_target(sched, x0, t, eps).float()).pow(2).mean()
        metrics = {"loss_dm": float(loss_dm.detach())}
        loss = loss_dm
        if self.adversarial:
            # 4. the look-ahead s and the two projections to t - s: the model's (fake) and the truth's (real)
            s = torch.floor(ctx.local(u, strided=True) * (torch.clamp(t, max=int(c.k * T)) + 1)).long()
            t_to = t - s
            x0_hat, eps_hat = x0_and_eps(sched, out, t, x_t)
            if clips_x0(sched):  # the sampler's own DDIM step clips x0_hat (diffalign.ddim.ddim_step, 3.)
                x0_hat = x0_hat.clamp(-sched.config.clip_sample_range, sched.config.clip_sample_range)
            fake = project(sched, x0_hat, eps_hat, t_to)
            with torch.no_grad():
                real = project(sched, x0, noise_of(sched, x_t, x0, t), t_to)
            text = cond.mean(1).float()
            # 5. the generator's adversarial term (D's weights are not trained by it)
            self.disc.requires_grad_(False)
            loss_adv = generator_loss(self.disc(fake.float(), t, t_to, text), c.adv_loss)
            self.disc.requires_grad_(True)
            loss = loss_dm + c.gamma * loss_adv
            metrics.update(loss_adv=float(loss_adv.detach()), mean_s=float(s.float().mean()))
        # 6. the generator's update
        ctx.backward(loss)
        metrics["grad_norm"] = ctx.clip_grad(c.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.adversarial:
            # 7. the discriminator's update on the same batch: hinge + R1 on real
            real_in = real.float().detach().requires_grad_(True)
            d_real = self.disc(real_in, t, t_to, text)
            d_fake = self.disc(fake.float().detach(), t, t_to, text)
            r1 = r1_penalty(d_real, real_in)
            loss_d = discriminator_hinge(d_real, d_fake) + c.r1_weight * r1
            ctx.backward(loss_d)
            self.d_opt.step()
            self.d_opt.zero_grad(set_to_none=True)
            metrics.update(loss_d=float(loss_d.detach()), r1=float(r1.detach()), d_real=float(d_real.detach().mean()),
                           d_fake=float(d_fake.detach().mean()))
        self.seen += n
        return {**metrics, "loss": float(loss.detach()), "real_images": self.seen}

    def state_dict(self) -> dict:
        state = {"optimizer": self.opt.state_dict(), "seen": self.seen}
        if self.adversarial:
            state.update(disc=self.disc.state_dict(), d_optimizer=self.d_opt.state_dict(),
                         s_gen=self.s_gen.get_state())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.seen = state["seen"]
        if self.adversarial:
            self.disc.load_state_dict(state["disc"])
            self.d_opt.load_state_dict(state["d_optimizer"])
            self.s_gen.set_state(state["s_gen"])

