"""The Frechet distance between two sets of features, each summarised by a Gaussian (mean, covariance).

Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium", arXiv 1706.08500 (FID: this distance in Inception features).  For N(mu1, S1), N(mu2, S2):

    FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr( (S1^{1/2} S2 S1^{1/2})^{1/2} )

computed in float64 through symmetric eigendecompositions (S1^{1/2} from S1's, then the trace of the square root
of the symmetric positive semi-definite S1^{1/2} S2 S1^{1/2} as the sum of the square roots of its eigenvalues),
which needs no scipy and stays real where a general matrix square root picks up imaginary rounding.  Covariances
are unbiased (divisor N - 1), as FID's reference code uses.
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Stats:
    """A feature set's Gaussian summary."""

    mean: torch.Tensor   # (D,) float64
    cov: torch.Tensor    # (D, D) float64
    n: int

    @classmethod
    def of(cls, features: torch.Tensor) -> "Stats":
        f = features.detach().double().cpu().flatten(1)
        if f.shape[0] < 2:
            raise ValueError(f"Frechet statistics need at least 2 feature vectors, got {f.shape[0]}")
        return cls(f.mean(0), torch.cov(f.T).reshape(f.shape[1], f.shape[1]), f.shape[0])


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance(a: Stats, b: Stats) -> float:
    """FD between the Gaussians of two feature sets (see the module docstring)."""
    s1 = _psd_sqrt(a.cov)
    inner = s1 @ b.cov @ s1
    tr_sqrt = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()
    diff = a.mean - b.mean
    return float(diff @ diff + torch.trace(a.cov) + torch.trace(b.cov) - 2 * tr_sqrt)
