"""Rectified-flow steps (diffalign/flow.py): the Euler ODE step against diffusers' FlowMatchEulerDiscreteScheduler, and
Flow-GRPO's SDE step against closed forms on a Gaussian data law, where the velocity and the marginals are exact.

Gaussian data x_0 ~ N(MU, S^2 I).  x_t = (1 - t) x_0 + t eps is Gaussian with mean m_t = (1 - t) MU and variance
V_t = (1 - t)^2 S^2 + t^2 per coordinate; Cov(eps, x_t) = t and Cov(x_0, x_t) = (1 - t) S^2, so
E[eps | x] = t (x - m_t) / V_t, E[x_0 | x] = MU + (1 - t) S^2 (x - m_t) / V_t and the exact velocity is
v(x, t) = E[eps - x_0 | x] = c_t (x - m_t) - MU with c_t = (t - (1 - t) S^2) / V_t  (= dlog sqrt(V_t)/dt, as the
ODE dx/dt = v needs to carry N(m_t, V_t) along).  Both steps are then affine in x plus Gaussian noise, so the chain's
own law stays Gaussian and its moments can be pushed exactly through the library's step (``propagate``): the
difference between those and (m_t, V_t) is the discretisation error alone, free of Monte-Carlo noise.
"""
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from diffalign import flow

MU = torch.tensor([0.8, -0.5, 0.0, 1.5], dtype=torch.float64)
S = 0.3
A = 0.7
N = 40_000  # Monte-Carlo samples per coordinate (4 coordinates)
Z = 4.5     # standard errors allowed


@pytest.fixture(autouse=True)
def _one_thread():
    """Elementwise work on 160k-element tensors: a second thread buys nothing and, on a busy 2-core machine, costs
    a lot (measured 50x in a test run beside a benchmark); the suite's thread count is restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def marginal(t: float) -> tuple[torch.Tensor, float]:
    return (1 - t) * MU, (1 - t) ** 2 * S ** 2 + t ** 2


def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
    m, var = marginal(t)
    return (t - (1 - t) * S ** 2) / var * (x - m) - MU


def step(x, t, t_next, a, generator=None, noise=None):
    """One step of the sampler under test: Euler ODE when a is None, else Flow-GRPO's SDE."""
    v = velocity(x, t)
    if a is None:
        return flow.euler_step(x, v, t, t_next)
    return flow.sde_step(x, v, t, t_next, a, generator=generator, noise=noise).prev


def propagate(sigmas, a, ode_above: float = 2.0):
    """The exact law N(m_k, V_k) of the chain after every step, pushed through the library's step (affine in x: the
    images of m and m + 1 give the offset and the slope; the step's std adds its variance).  The ODE where t >
    ode_above.  Returns [(t_next, m (4,), V)]."""
    m, var = marginal(float(sigmas[0]))
    out = []
    for t, t_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = torch.stack([m, m + 1])
        sde = a is not None and t <= ode_above
        if sde:
            st = flow.sde_step(x, velocity(x, t), t, t_next, a, noise=torch.zeros_like(x))
            y, add = st.mean, float(st.std) ** 2
        else:
            y, add = flow.euler_step(x, velocity(x, t), t, t_next), 0.0
        slope = float((y[1] - y[0]).mean())
        m, var = y[0], slope ** 2 * var + add
        out.append((t_next, m, var))
    return out


def sample_moments(sigmas, a, n=N, seed=0, ode_above: float = 2.0):
    """Monte-Carlo run of the sampler from N(0, I) at sigmas[0]: [(t_next, mean (4,), var (4,))] after every step."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, MU.numel(), generator=g, dtype=torch.float64)
    out = []
    for t, t_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        x = step(x, t, t_next, a if t <= ode_above else None, generator=g)
        out.append((t_next, x.mean(0), x.var(0)))
    return out


def z_scores(mean, var, m_ref, v_ref, n=N):
    """(sample mean - m_ref) and (sample var - v_ref) in standard errors of a Gaussian sample of n."""
    return (mean - m_ref) / math.sqrt(v_ref / n), (var - v_ref) / (v_ref * math.sqrt(2 / (n - 1)))


# ---- the Euler ODE step: diffusers' scheduler, and the transport of N(0, I) to the data law ----------------------

@pytest.mark.parametrize("config", [{"shift": 1.0}, {"shift": 3.0}, {"use_dynamic_shifting": True}])
def test_euler_step_equals_diffusers_flow_match_scheduler(config):
    sched = FlowMatchEulerDiscreteScheduler(**config)
    kw = {"mu": 0.8} if config.get("use_dynamic_shifting") else {}
    sigmas = flow.set_sigmas(sched, 7, **kw)
    assert sigmas.dtype == torch.float64 and len(sigmas) == 8
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    assert torch.equal(sigmas.float(), sched.sigmas)
    assert torch.allclose(sched.timesteps.double(), sigmas[:-1] * 1000, rtol=1e-6)
    if config.get("shift") == 3.0:  # the SD3 shift really moves the schedule: t = 3u / (1 + 2u)
        # diffusers spaces u from 1 to its sigma_min, which __init__ already shifted: 3 (1/1000) / (1 + 2/1000)
        u = torch.linspace(1, 0.003 / 1.002, 7, dtype=torch.float64)
        assert torch.allclose(sigmas[:-1], 3 * u / (1 + 2 * u), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(2, 4, 8, 8, generator=g)
        ref = sched.step(v, t, x).prev_sample
        ours = flow.euler_step(x, v, sigmas[i], sigmas[i + 1])
        assert ours.dtype == ref.dtype
        assert torch.allclose(ours, ref, rtol=1e-6, atol=1e-6), (i, (ours - ref).abs().max())
        x = ours


def test_ode_maps_noise_to_the_data_law():
    """500 Euler steps on diffusers' unshifted schedule carry N(0, I) to N(MU, S^2): the final mean and variance are
    within 4.5 SE of the data law's (20k samples x 4 coordinates), plus 0.002 in variance for Euler's first-order
    error (the exact law of this 500-step chain, ``propagate``, has variance 0.0893 against 0.09; 0.0068 short at
    50 steps).  Measured: largest |z| 1.5 (mean), 0.73 (variance)."""
    sigmas = flow.set_sigmas(FlowMatchEulerDiscreteScheduler(shift=1.0), 500)
    chain = propagate(sigmas, None)[-1]
    assert abs(chain[2] - S ** 2) < 0.002 and torch.allclose(chain[1], MU, atol=1e-9)
    n = 20_000
    _, mean, var = sample_moments(sigmas, None, n=n)[-1]
    zm = (mean - MU) / math.sqrt(S ** 2 / n)
    zv = (var - S ** 2).abs() - 0.002
    assert zm.abs().max() < Z, zm
    assert (zv < Z * S ** 2 * math.sqrt(2 / (n - 1))).all(), var


# ---- the SDE step: marginals at every step, the t = 1 step, convergence --------------------------------------

def test_sde_keeps_the_exact_marginals_at_every_step():
    """From N(0, I) at t = 1: the Euler ODE down to t = 0.98 (8 steps), then Flow-GRPO's SDE (a = 0.7) for the 392
    steps of a 400-step uniform grid.  At every step, each coordinate's sample mean and variance (40k samples) are
    within 4.5 SE of the exact marginal's plus an allowance: the exact chain's own deviation (``propagate``),
    itself asserted below 1 SE (the discretisation: first order in the step).  Measured: the chain's largest
    deviation 0.82 SE (0.0049 in variance); the samples against the exact marginal, largest |z| 2.4 (mean) and 3.2
    (variance) over 392 steps x 4 coordinates, 2.4 for both net of the allowance.
    Why not from t = 1: see test_sde_first_step_at_t1_is_off_by_a4_over_4."""
    sigmas = torch.linspace(1, 0, 401, dtype=torch.float64)
    chain = propagate(sigmas, A, ode_above=0.98 + 1e-9)
    runs = sample_moments(sigmas, A, ode_above=0.98 + 1e-9)
    worst_m = worst_v = worst_chain = 0.0
    for (t, m_c, v_c), (_, mean, var) in zip(chain, runs):
        m_t, v_t = marginal(t)
        cm, cv = z_scores(m_c, torch.tensor(v_c), m_t, v_t)
        zm, zv = z_scores(mean, var, m_t, v_t)
        worst_chain = max(worst_chain, float(cm.abs().max()), float(cv.abs().max()))
        worst_m = max(worst_m, float((zm.abs() - cm.abs()).max()))
        worst_v = max(worst_v, float((zv.abs() - cv.abs()).max()))
    assert worst_chain < 1.0, worst_chain
    assert worst_m < Z and worst_v < Z, (worst_m, worst_v)


def test_sde_first_step_at_t1_is_off_by_a4_over_4():
    """The sampler as it runs, from t = 1 with FIRST_STEP's guard (Flow-GRPO's code), 200 uniform steps, 40k samples.
    (1) The sampler is the chain ``propagate`` computes: every step's mean and variance within 4.5 SE of the exact
    chain's.  (2) The means are exact at every step for this data law (the mean path is linear).  (3) The first step
    has std = a exactly and variance (1 - a^2/2 + dt)^2 + a^2, above the marginal by a^4/4 + a^2 |dt| + O(dt^2)
    (0.060 + 0.0025 here, 8.5 to 9.7 SE in the samples) whatever the number of steps, because sigma_t^2 |dt| = a^2
    is not small; the next steps, where |dt| ~ 1 - t, add more (+0.0975 after the second step) and the excess decays
    along the trajectory (+0.0060 at t = 0.5, -4e-5 at t = 0).  Measured: largest |z| against the chain 2.5."""
    n_steps = 200
    sigmas = torch.linspace(1, 0, n_steps + 1, dtype=torch.float64)
    chain = propagate(sigmas, A)
    runs = sample_moments(sigmas, A)
    worst = 0.0
    for (t, m_c, v_c), (_, mean, var) in zip(chain, runs):
        zm, zv = z_scores(mean, var, m_c, v_c)
        worst = max(worst, float(zm.abs().max()), float(zv.abs().max()))
        m_t, _ = marginal(t)
        assert torch.allclose(m_c, m_t, atol=1e-12)
    assert worst < Z, worst
    # the first step, by hand: t = 1, dt = -h, std = a, x' = (1 - a^2/2) x + v dt with v = x - MU at t = 1
    h = 1 / n_steps
    st = flow.sde_step(torch.zeros(1, 4, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64), 1.0, 1 - h, A,
                       noise=torch.zeros(1, 4, dtype=torch.float64))
    assert float(st.std) == pytest.approx(A, rel=1e-12)
    v_first = (1 - A ** 2 / 2 - h) ** 2 + A ** 2
    assert chain[0][2] == pytest.approx(v_first, rel=1e-12)
    excess = v_first - marginal(1 - h)[1]
    assert excess == pytest.approx(A ** 4 / 4 + A ** 2 * h, abs=2 * h ** 2)
    _, zv = z_scores(runs[0][1], runs[0][2], marginal(1 - h)[0], marginal(1 - h)[1])
    assert (zv > 6).all(), zv  # really visible in the samples: 8 SE


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_sde_error_shrinks_with_the_number_of_steps(shift):
    """The final variance error of the exact chain (``propagate``, through the library's steps) on diffusers'
    schedule, from t = 1: shift 1: SDE -0.0114, -0.0017, -0.00004 at 10, 50, 200 steps (the plain Euler ODE
    -0.0316, -0.0068, -0.0017); shift 3 (SD3): SDE -0.0205, -0.0085, -0.0021 (ODE -0.0581, -0.0146, -0.0039).
    At tens of steps the Euler error of the ODE itself dominates: the SDE's error has the ODE's sign and order, it is
    the discretisation, not a wrong formula.  Away from t = 1 the excess of the first steps shrinks too, slowly
    (about n^-1/2 at t = 0.5: 0.0155, 0.0060, 0.0026 at 50, 200, 800 uniform steps).  A 10-step Monte-Carlo run
    (40k samples) matches the chain within 4.5 SE (measured: 2.1 SE at shift 1, 1.8 at shift 3)."""
    errs, ode_errs = [], []
    for n in (10, 50, 200):
        sigmas = flow.set_sigmas(FlowMatchEulerDiscreteScheduler(shift=shift), n)
        errs.append(propagate(sigmas, A)[-1][2] - S ** 2)
        ode_errs.append(propagate(sigmas, None)[-1][2] - S ** 2)
    assert abs(errs[0]) > abs(errs[1]) > abs(errs[2]), errs
    assert abs(ode_errs[0]) > abs(ode_errs[1]) > abs(ode_errs[2]), ode_errs
    for e, o in zip(errs[:2], ode_errs[:2]):  # tens of steps: the ODE's Euler error, same sign, same order
        assert e * o > 0 and 0.1 < e / o < 1, (e, o)
    half = []
    for n in (50, 200):
        chain = propagate(torch.linspace(1, 0, n + 1, dtype=torch.float64), A)
        t, _, var = next(c for c in chain if abs(c[0] - 0.5) < 1e-9)
        half.append(var - marginal(t)[1])
    assert half[0] > half[1] > 0, half
    sigmas = flow.set_sigmas(FlowMatchEulerDiscreteScheduler(shift=shift), 10)
    _, mean, var = sample_moments(sigmas, A)[-1]
    _, m_c, v_c = propagate(sigmas, A)[-1]
    zm, zv = z_scores(mean, var, m_c, v_c)
    assert zm.abs().max() < Z and zv.abs().max() < Z, (zm, zv)
    assert (var - S ** 2).mean() * errs[0] > 0  # the samples show the 10-step error's sign


# ---- the log-probability: the density of the sample taken, and its gradient ------------------------------------

def hand_step(x, v, t, t_next, a):
    """Mean and std of the SDE step written out from the formulas (float64, per sample), the guard at t = 1."""
    x, v = x.double(), v.double()
    t, t_next = torch.as_tensor(t, dtype=torch.float64), torch.as_tensor(t_next, dtype=torch.float64)
    dt = t_next - t
    var_rate = a ** 2 * t / torch.where(t == 1, 1 - t_next, 1 - t)  # sigma_t^2
    r = lambda c: c.view(-1, *([1] * (x.dim() - 1)))  # noqa: E731
    mean = x * r(1 + var_rate * dt / (2 * t)) + v * r((1 + var_rate * (1 - t) / (2 * t)) * dt)
    return mean, (var_rate * -dt).sqrt()


def hand_log_density(x_prev, mean, std):
    """-(x - m)^2 / (2 s^2) - log s - log(2 pi) / 2 per element, float64, s one per sample."""
    s = std.double().view(-1, *([1] * (x_prev.dim() - 1)))
    return -((x_prev.double() - mean.double()) ** 2) / (2 * s ** 2) - s.log() - 0.5 * math.log(2 * math.pi)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_is_the_density_of_the_sample_taken(dtype, reduction):
    """Per-sample t (the t = 1 step with its guard, a middle step, the last step to t = 0): the step's mean and std
    equal the formulas written out; the sample taken is mean + std z; its log-prob equals the Gaussian density by
    hand, in float64, and with bf16 latents (the log-prob then in float32, within 1e-4 of the float64 value of the
    same bf16 numbers, where a bf16 mean would miss by far more)."""
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1.0, 0.6, 0.1], dtype=torch.float64)
    t_next = torch.tensor([0.9, 0.45, 0.0], dtype=torch.float64)
    x = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    z = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64).to(dtype)
    st = flow.sde_step(x, v, t, t_next, A, noise=z)
    mean, std = hand_step(x, v, t, t_next, A)
    assert st.prev.dtype == dtype and st.mean.dtype == torch.promote_types(dtype, torch.float32)
    assert torch.allclose(st.std, std, rtol=1e-12)
    assert float(st.std[0]) == pytest.approx(A, rel=1e-12)  # the guarded t = 1 step: std = a
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(st.mean.double(), mean, rtol=tol, atol=tol)
    want_prev = (mean + std.view(-1, 1, 1, 1) * z.double()).to(dtype)  # bf16: within one unit in the last place
    ulp = tol if dtype == torch.float64 else 2 ** -7
    assert torch.allclose(st.prev.double(), want_prev.double(), rtol=ulp, atol=tol)
    lp = flow.step_log_prob(st.prev, st.mean, st.std, reduction)
    dens = hand_log_density(st.prev, mean, std).flatten(1)
    want = dens.mean(1) if reduction == "mean" else dens.sum(1)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    assert torch.allclose(lp.double(), want, rtol=tol, atol=tol), (lp, want)
    if dtype == torch.bfloat16:  # the float32 arithmetic matters: a bf16-rounded mean moves it by far more
        bad = hand_log_density(st.prev, mean.to(torch.bfloat16), std).flatten(1)
        assert (bad - dens).abs().max() > 100 * tol


def test_sde_step_details():
    """a = 0 is the Euler ODE step; per-sample t equals one call per sample; ``prev`` given is scored, not drawn;
    a generator's draw is reproducible; the variant names carry a; bad steps are refused."""
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    t, t_next = torch.tensor([1.0, 0.5, 0.2]), torch.tensor([0.8, 0.3, 0.0])
    ode = flow.sde_step(x, v, t, t_next, 0.0, noise=torch.randn(3, 5, generator=g))
    assert torch.allclose(ode.prev, flow.euler_step(x, v, t, t_next), atol=1e-7) and float(ode.std.max()) == 0
    z = torch.randn(3, 5, generator=g)
    batched = flow.sde_step(x, v, t, t_next, A, noise=z)
    for i in range(3):
        one = flow.sde_step(x[i:i + 1], v[i:i + 1], float(t[i]), float(t_next[i]), A, noise=z[i:i + 1])
        assert torch.allclose(batched.prev[i], one.prev[0], atol=1e-7)
        assert torch.allclose(batched.std[i], one.std, rtol=1e-12)
    scored = flow.sde_step(x, v, t, t_next, A, prev=batched.prev)
    assert scored.prev is batched.prev and torch.equal(scored.mean, batched.mean)
    d1 = flow.sde_step(x, v, t, t_next, A, generator=torch.Generator().manual_seed(5)).prev
    d2 = flow.sde_step(x, v, t, t_next, A, generator=torch.Generator().manual_seed(5)).prev
    assert torch.equal(d1, d2) and not torch.equal(d1, batched.prev)
    assert flow.sde_variant(0.7) == flow.SDE_VARIANT.format(a=0.7) and "a=0.7" in flow.sde_variant(0.7)
    assert "Flow-GRPO" in flow.FIRST_STEP and flow.LOGPROB_REDUCTIONS == ("mean", "sum")
    with pytest.raises(ValueError):
        flow.sde_step(x, v, 0.3, 0.5, A)
    with pytest.raises(ValueError):
        flow.step_log_prob(batched.prev, batched.mean, batched.std, "max")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_gradient_matches_finite_differences(reduction):
    """d log p(x_prev | x) / d v (x_prev fixed: the sample taken), and through v = W x + b to W and b, against central
    differences (float64, h = 1e-6): relative error below 1e-6."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    t, t_next = torch.tensor([1.0, 0.7, 0.4, 0.05], dtype=torch.float64), torch.tensor([0.9, 0.6, 0.3, 0.0],
                                                                                         dtype=torch.float64)
    model = torch.nn.Linear(3, 3, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 3, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        x_prev = flow.sde_step(x, model(x), t, t_next, A, generator=g).prev

    def objective(v):
        st = flow.sde_step(x, v, t, t_next, A, prev=x_prev)
        lp = flow.step_log_prob(x_prev, st.mean, st.std, reduction)
        return (lp * torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)).sum()

    def check(param, f):
        grad, = torch.autograd.grad(f(), param)
        fd = torch.zeros_like(param)
        with torch.no_grad():
            for i in range(param.numel()):
                p = param.view(-1)
                keep = p[i].item()
                p[i] = keep + 1e-6
                up = f()
                p[i] = keep - 1e-6
                down = f()
                p[i] = keep
                fd.view(-1)[i] = (up - down) / 2e-6
        assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-6 * fd.abs().max()), (grad, fd)
        assert fd.abs().max() > 1e-3  # not a vacuous zero gradient

    v = model(x).detach().requires_grad_(True)
    check(v, lambda: objective(v))
    check(model.weight, lambda: objective(model(x)))
    check(model.bias, lambda: objective(model(x)))
