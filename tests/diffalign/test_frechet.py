"""The Frechet distance (diffalign/frechet.py) against its closed forms."""
import math

import pytest
import torch

from diffalign.frechet import Stats, frechet_distance


def _stats(mean, cov) -> Stats:
    return Stats(torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64), 1000)


def test_commuting_covariances_give_the_sum_of_squared_root_differences():
    # diagonal covariances commute: FD = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    a, b = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([9.0, 1.0, 0.25])
    fd = frechet_distance(_stats([0.0, 1.0, 2.0], torch.diag(a)), _stats([1.0, -1.0, 2.0], torch.diag(b)))
    assert fd == pytest.approx((1 + 4 + 0) + (1 - 3) ** 2 + (2 - 1) ** 2 + 0, rel=1e-12)


def test_two_by_two_covariances_match_the_closed_form_trace_of_the_square_root():
    # for 2x2 PSD matrices, tr sqrt(S1^1/2 S2 S1^1/2) = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        m1, m2 = (torch.randn(2, 2, generator=g, dtype=torch.float64) for _ in range(2))
        eye = 0.1 * torch.eye(2, dtype=torch.float64)
        s1, s2 = m1 @ m1.T + eye, m2 @ m2.T + eye
        mu1, mu2 = torch.randn(2, generator=g, dtype=torch.float64), torch.randn(2, generator=g, dtype=torch.float64)
        tr_sqrt = math.sqrt(float(torch.trace(s1 @ s2)) + 2 * math.sqrt(float(torch.det(s1) * torch.det(s2))))
        closed = float((mu1 - mu2) @ (mu1 - mu2) + torch.trace(s1) + torch.trace(s2)) - 2 * tr_sqrt
        assert frechet_distance(_stats(mu1, s1), _stats(mu2, s2)) == pytest.approx(closed, rel=1e-10, abs=1e-12)


def test_identical_gaussians_are_at_distance_zero_and_sample_statistics_converge():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    cov = m @ m.T + torch.eye(4, dtype=torch.float64)
    assert frechet_distance(_stats(torch.zeros(4), cov), _stats(torch.zeros(4), cov)) == pytest.approx(0, abs=1e-9)
    # samples of N(mu, cov): their Stats estimate the Gaussian (FD to the truth small, shrinking with N)
    chol = torch.linalg.cholesky(cov)
    truth = _stats(torch.ones(4), cov)
    fds = []
    for n in (200, 20_000):
        x = torch.ones(4, dtype=torch.float64) + torch.randn(n, 4, generator=g, dtype=torch.float64) @ chol.T
        fds.append(frechet_distance(Stats.of(x), truth))
    assert fds[1] < fds[0] and fds[1] < 0.01
    with pytest.raises(ValueError, match="at least 2"):
        Stats.of(torch.zeros(1, 4))
