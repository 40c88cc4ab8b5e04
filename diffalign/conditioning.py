"""Packed conditioning: a model's text sequence and pooled text vector carried as one (B, L + 1, D) tensor.

The suite's samplers hand a denoiser a single ``encoder_hidden_states`` tensor (as SD 1.5's UNet takes it); models
that also take a pooled text vector (SDXL's added conditioning, SD3's and FLUX's ``pooled_projections``) get it packed
as one extra token, ``[pooled, 0...]``, which their loader-side forward unpacks.  Shared by ``diffalign.pipeline``
(SDXL) and ``diffalign.flow_models`` (SD3, FLUX), so neither imports the other for it.
"""
from __future__ import annotations

import torch


def pack_pooled(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states and (B, P) pooled embeddings, P <= D -> (B, L + 1, D): one extra token [pooled, 0]."""
    extra = torch.zeros(hidden.shape[0], 1, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device)
    extra[:, 0, :pooled.shape[-1]] = pooled.to(hidden.dtype)
    return torch.cat([hidden, extra], dim=1)


def unpack_pooled(encoder_hidden_states: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of ``pack_pooled``: (B, L + 1, D) -> text sequence (B, L, D), pooled (B, P)."""
    hidden = encoder_hidden_states[:, :-1].contiguous()
    pooled = encoder_hidden_states[:, -1, :pooled_dim].contiguous()
    return hidden, pooled
