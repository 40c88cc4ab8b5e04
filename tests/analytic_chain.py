"""A small analytic chain for testing gradient estimators against exact gradients.

A linear-Gaussian "denoiser" with T steps, applied to x_start ~ N(0, I) in R^d:

    x_{k+1} = A_k x_k + B_k theta + sigma_k z_k,    z_k ~ N(0, I),   k = 0..T-1

and a quadratic terminal reward R(x) = w.x - lam/2 |x|^2.  The final state is Gaussian with mean
m(theta) = sum_k Phi_{k+1} B_k theta (Phi_{k+1} = A_{T-1} ... A_{k+1}) and a covariance that does not
depend on theta, so E[R] and its gradient are known in closed form:

    E[R] = w.m - lam/2 (|m|^2 + tr Cov),   grad = sum_k B_k^T Phi_{k+1}^T (w - lam m)

and the k-th term of that sum is step k's exact contribution (what each step's parameters add).
"""
from __future__ import annotations

import torch


class LinearGaussianChain:
    def __init__(self, d: int = 3, p: int = 2, T: int = 4, lam: float = 0.5, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        kw = dict(generator=g, dtype=torch.float64)
        self.d, self.p, self.T, self.lam = d, p, T, lam
        self.A = [0.9 * torch.eye(d, dtype=torch.float64) + 0.15 * torch.randn(d, d, **kw) for _ in range(T)]
        self.B = [0.6 * torch.randn(d, p, **kw) for _ in range(T)]
        self.sigma = torch.linspace(0.8, 0.3, T, dtype=torch.float64).tolist()
        self.w = torch.randn(d, **kw)

    def mean(self, k: int, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """The step's mean for a batch x (n, d): A_k x + B_k theta."""
        return x @ self.A[k].T + self.B[k] @ theta

    @torch.no_grad()
    def sample(self, theta: torch.Tensor, n: int, generator: torch.Generator) -> list[torch.Tensor]:
        xs = [torch.randn(n, self.d, generator=generator, dtype=torch.float64)]
        for k in range(self.T):
            z = torch.randn(n, self.d, generator=generator, dtype=torch.float64)
            xs.append(self.mean(k, xs[-1], theta) + self.sigma[k] * z)
        return xs

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w - 0.5 * self.lam * (x * x).sum(-1)

    def _phi(self, k: int) -> torch.Tensor:
        """Phi_k = A_{T-1} ... A_k (identity for k = T)."""
        out = torch.eye(self.d, dtype=torch.float64)
        for j in range(k, self.T):
            out = self.A[j] @ out
        return out

    def final_mean(self, theta: torch.Tensor) -> torch.Tensor:
        return sum(self._phi(k + 1) @ self.B[k] @ theta for k in range(self.T))

    def expected_reward(self, theta: torch.Tensor) -> torch.Tensor:
        m = self.final_mean(theta)
        cov = self._phi(0) @ self._phi(0).T + sum(
            self.sigma[k] ** 2 * self._phi(k + 1) @ self._phi(k + 1).T for k in range(self.T))
        return self.w @ m - 0.5 * self.lam * (m @ m + torch.trace(cov))

    def step_contributions(self, theta: torch.Tensor) -> list[torch.Tensor]:
        resid = self.w - self.lam * self.final_mean(theta)
        return [self.B[k].T @ self._phi(k + 1).T @ resid for k in range(self.T)]

    def exact_gradient(self, theta: torch.Tensor) -> torch.Tensor:
        return sum(self.step_contributions(theta))
