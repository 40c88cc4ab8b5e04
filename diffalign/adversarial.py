"""A noise-level-conditioned discriminator and its losses: the adversarial half of OGDM.

Kang, Choi, Choi, Han, "Observation-Guided Diffusion Probabilistic Models", CVPR 2024, arXiv 2310.04041.  OGDM
augments the denoising chain with an observation y ~ Bernoulli ("is this point on the noisy real-data manifold at
level t - s?") whose likelihood is a discriminator D(x; t, s, c).  This file is written from the paper's
description and the notes in the suite's method reference, not from the authors' code (non-commercial licence).

The discriminator (``Discriminator``) is a small ResNet in the spirit of StyleGAN2's (Karras et al., arXiv
1912.04958): a 3x3 stem, ``blocks`` residual blocks each halving the resolution (leaky ReLU 0.2, average-pool
downsampling, a 1x1 skip scaled by 1/sqrt(2)), a minibatch standard-deviation channel, then global sum pooling
to a feature h.  It works on pixels or on a latent model's latents (``in_channels``), at any resolution that the
blocks can halve.  Conditioning is by projection (Miyato & Koyama, arXiv 1802.05637):

    D(x; t, s, c) = w^T h + < h, e(t, s, c) >,   e = MLP([sin/cos features of t/T and of (t - s)/T]) + W_c c

with c the caption's pooled text embedding, so the same D judges every noise level and every caption.

The losses (OGDM's defaults, hinge, as its ADM configuration; logistic = the paper's Bernoulli likelihood form):

    generator      hinge: -D(fake)            logistic: softplus(-D(fake)) = -log sigmoid(D(fake))
    discriminator  relu(1 - D(real)) + relu(1 + D(fake)) + lambda_R1 ||grad_real D(real)||^2   (R1 on reals only,
                   Mescheder, Geiger, Nowozin, arXiv 1801.04406)

each averaged over the batch.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn

ADV_LOSSES = ("hinge", "logistic")


def timestep_features(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal features of timesteps t (B,) (any scale; here in units of the 1000-step chain): (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class _Block(nn.Module):
    """A residual block that halves the resolution: two 3x3 convs (leaky ReLU 0.2), avg-pool, 1x1 skip."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_in, 3, padding=1)
        self.conv2 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = F.avg_pool2d(F.leaky_relu(self.conv2(h), 0.2), 2)
        return (h + F.avg_pool2d(self.skip(x), 2)) / math.sqrt(2)


def minibatch_std(x: torch.Tensor, group: int = 4) -> torch.Tensor:
    """Append one channel: the mean over features of the std over each group of up to ``group`` samples."""
    b, c, h, w = x.shape
    g = math.gcd(b, group)
    y = x.reshape(g, -1, c, h, w)
    y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B / g,)
    y = y.view(1, -1, 1, 1, 1).expand(g, -1, 1, h, w).reshape(b, 1, h, w)
    return torch.cat([x, y], dim=1)


class Discriminator(nn.Module):
    """D(x; t, s, c): a small projection-conditioned ResNet (see the module docstring)."""

    def __init__(self, in_channels: int = 3, channels: int = 32, blocks: int = 3, text_dim: int = 64,
                 num_train_timesteps: int = 1000, t_features: int = 64):
        super().__init__()
        self.config = {"in_channels": in_channels, "channels": channels, "blocks": blocks, "text_dim": text_dim,
                       "num_train_timesteps": num_train_timesteps, "t_features": t_features}
        widths = [min(channels * 2 ** i, 8 * channels) for i in range(blocks + 1)]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList(_Block(widths[i], widths[i + 1]) for i in range(blocks))
        self.epilogue = nn.Conv2d(widths[-1] + 1, widths[-1], 3, padding=1)
        feat = widths[-1]
        self.out = nn.Linear(feat, 1)
        self.embed_ts = nn.Sequential(nn.Linear(2 * t_features, feat), nn.SiLU(), nn.Linear(feat, feat))
        self.embed_text = nn.Linear(text_dim, feat, bias=False)
        self.t_features, self.T = t_features, num_train_timesteps

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.stem(x), 0.2)
        for block in self.blocks:
            h = block(h)
        h = F.leaky_relu(self.epilogue(minibatch_std(h)), 0.2)
        return h.sum(dim=(2, 3))

    def forward(self, x: torch.Tensor, t: torch.Tensor, t_to: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Logits (B,) for inputs x at level ``t_to`` projected from ``t`` (training timesteps, (B,) each) with
        pooled caption embeddings ``text`` (B, text_dim).  In float32 whatever the autocast around it: the R1
        penalty's double backward overflows half precision (NaN in fp16 at the first step on the tiny world)."""
        kind = x.device.type
        with torch.autocast(kind, enabled=False) if torch.amp.is_autocast_available(kind) else contextlib.nullcontext():
            return self._logits(x.float(), t, t_to, text.float())

    def _logits(self, x: torch.Tensor, t: torch.Tensor, t_to: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        scale = 1000.0 / self.T  # features in units of a 1000-step chain, whatever the scheduler's length
        ts = torch.cat([timestep_features(t.to(x.device) * scale, self.t_features),
                        timestep_features(t_to.to(x.device) * scale, self.t_features)], dim=1)
        e = self.embed_ts(ts) + self.embed_text(text.to(h.dtype))
        return self.out(h).squeeze(1) + (h * e).sum(1)


def generator_loss(fake_logits: torch.Tensor, kind: str = "hinge") -> torch.Tensor:
    """The generator's adversarial term: hinge -D(fake), or logistic softplus(-D(fake)); batch mean."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "logistic":
        return F.softplus(-fake_logits).mean()
    raise ValueError(f"adversarial loss {kind!r}; accepted: {', '.join(ADV_LOSSES)}")


def discriminator_hinge(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """relu(1 - D(real)) + relu(1 + D(fake)), each a batch mean."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def r1_penalty(real_logits: torch.Tensor, real_inputs: torch.Tensor) -> torch.Tensor:
    """Batch mean of ||grad_x D(x)||^2 at the real inputs (which must require grad); keeps the graph, so the
    penalty itself can be backpropagated into D."""
    (grad,) = torch.autograd.grad(real_logits.sum(), real_inputs, create_graph=True)
    return grad.pow(2).flatten(1).sum(1).mean()
