"""RLR: the Recursive Likelihood Ratio optimizer ("half-order" fine-tuning of diffusion models).

Ren, Zhang, Jiang, Li, Qin, Zheng, Li, Sun, Li, Liang, Li, Peng, arXiv 2502.00639 (ICLR 2026).  This file is
the paper's estimator (method ``rlr``); what the released code (RTkenny/RLR-Optimizer) does instead is another
algorithm, in ``methods/rlr_code.py`` (method ``rlr-code``).

The sampler x_{k+1} = mu_k(x_k; theta) + sigma_k z_k (steps k = 0..T-1 in sampling order, 0 = pure noise,
T-1 = the step that makes x0) is split into three sets of steps, and the gradient of E[R(x0)] with respect to
the parameters of each set is estimated its own way:

    repeat
        c ~ prompts, x_T, z_0..z_{T-1} ~ N(0, I); roll out the chain (no gradients), R = reward(x0)
        j ~ q = softmax(per-window gradient-norm estimates)   (or uniform)    window W = {j .. j+h-1}
        C = every other step except the last                                    (the zeroth-order set)
        FO = d/dtheta R(mu_{T-1}(x_{T-1}; theta) + sigma z)      backprop through the last step only
        HO = d/dtheta (R - b) log N(x_{j+h}; mu_{j+h-1}(x~_{j+h-1}; theta), sigma^2)
             where x~ runs the h-1 first window steps from the detached x_j with gradients,
             reparameterised with their recorded noise: h-step local backprop x the likelihood ratio of
             the sampler's own noise at the window's last step (h = 1: DDPO's per-step term)
        ZO = 1/n sum_s (R(theta + eps u_s on C) - R(theta - eps u_s on C)) / (2 eps) u_s,  u_s ~ N(0, I)
             two-point perturbation of the parameters in the steps of C only, same noise for both points
        theta <- AdamW(theta, clip(-loss_coeff (FO + ho_weight HO + zo_weight ZO)))

    Unbiased for any fixed window j (the three sets partition the steps and each term is unbiased for its own
    steps' part of the gradient), hence for any q(j) that does not look at the current batch; no 1/q(j) weight.
    ``b`` is the leave-one-out batch mean; the HO log-density is the true one (summed over elements).  The
    derivation, and what ``tests/methods/test_rlr.py`` checks of it: ``docs/methods/rlr.md``.

    h: ``rlr.h`` directly, or from a memory budget (``rlr.memory_budget_mb``, the paper's rule)::

        B_h h + B_z (T - 1 - h) <= B   ->   h = min(floor((B - B_z (T-1)) / (B_h - B_z)), floor(T/2) - 1)

    clamped to 1..T-1; B_h = ``mem_backprop_step_mb`` (memory of one UNet step kept for backprop),
    B_z = ``mem_zo_step_mb`` (one forward-only step); floor(T/2) - 1 is the paper's variance bound with
    V_h << V_z (worked example with SD 1.4's figures: ``docs/methods/rlr.md``).

    j: ``softmax-gradnorm`` keeps a running (EMA) norm of the HO estimate of every window start, updated
    when that window is drawn; windows not yet seen take the mean of the others; the softmax is taken
    over norm / (j_temperature x mean norm), so it does not depend on the gradient's units.  ``uniform``
    draws j uniformly (the other summary of the paper).

    Non-differentiable reward: the FO term needs dR/dx0, so ``rlr`` refuses such a reward with one error
    line, unless ``rlr.first_order=false``: then the last step joins the zeroth-order set, which keeps
    the estimator unbiased with a scalar reward only (variant ``.../no-fo``).
"""
from __future__ import annotations

import dataclasses
import math

import torch

from diffalign import process
from diffalign.contract import NONNEG, POSITIVE, Choice, Flag, Int, Maybe, Real, rules
from diffalign.errors import BenchError
from diffalign.policy_gradient import check_stochastic_sampler
from diffalign.process import gaussian_log_prob, set_timesteps, step_noise, step_std
from diffalign.sampling import embed, guided_eps, replay_chain

CONFIG_SECTION = "rlr"
NEEDS_DIFFERENTIABLE_REWARD = False  # checked by the method itself: first_order=false works without
J_DISTS = ("softmax-gradnorm", "uniform")
HO_BASELINES = ("loo", "none")
DEFAULTS = {
    "batch_size": 8,
    "lr": 1e-3,
    "adam_betas": [0.9, 0.999],
    "adam_eps": 1e-8,
    "weight_decay": 1e-4,          # RLR_Config default
    "grad_clip": 1.0,
    "loss_coeff": 0.05,            # the released code's FO loss_coeff; rlr scales its whole estimate by it
    "checkpointing": True,         # gradient checkpointing of the UNet calls kept for backprop
    "h": 2,                        # half-order window length, unless memory_budget_mb is set
    "memory_budget_mb": None,      # set: h from the paper's memory rule (see the module docstring)
    "mem_backprop_step_mb": 8000.0,  # B_h (SD 1.4's figure)
    "mem_zo_step_mb": 240.0,         # B_z
    "j_dist": "softmax-gradnorm",  # softmax-gradnorm | uniform
    "j_temperature": 1.0,
    "j_ema": 0.9,                  # decay of the running per-window gradient norms
    "zo_samples": 2,               # two-point perturbation directions per update
    "zo_eps": 1e-3,
    "first_order": True,           # false: the last step joins the zeroth-order set (scalar reward only)
    "ho_baseline": "loo",          # loo (leave-one-out batch mean, unbiased) | none (raw R, as written)
    "ho_weight": 1.0,              # term weights: 1, 1 = the paper's unbiased estimator; others reweight the
    "zo_weight": 1.0,              # steps (biased, recorded in the variant), as the code's ho/zo coefficients do
}
RULES = rules(DEFAULTS, {
    "h": Int(1, 1000), "memory_budget_mb": Maybe(POSITIVE), "mem_backprop_step_mb": POSITIVE,
    "mem_zo_step_mb": POSITIVE, "j_dist": Choice(J_DISTS), "j_temperature": POSITIVE,
    "j_ema": Real(0.0, 1.0, hi_open=True), "zo_samples": Int(0, 10_000), "zo_eps": POSITIVE, "first_order": Flag(),
    "ho_baseline": Choice(HO_BASELINES), "ho_weight": NONNEG, "zo_weight": NONNEG})
SMOKE = {"rlr": ["rlr.batch_size=4"]}
companion_baseline = None


# ---- naming and validation ----------------------------------------------------------------------------

def choose_h(num_steps: int, budget_mb: float, b_h: float, b_z: float) -> int:
    """The paper's rule: the longest window that fits the memory budget, capped by the variance bound."""
    if b_h <= b_z:
        raise BenchError(f"rlr.mem_backprop_step_mb ({b_h}) must exceed rlr.mem_zo_step_mb ({b_z})")
    by_memory = math.floor((budget_mb - b_z * (num_steps - 1)) / (b_h - b_z))
    by_variance = num_steps // 2 - 1
    return max(1, min(num_steps - 1, by_memory, by_variance))


def window_length(cfg) -> int:
    r = cfg[CONFIG_SECTION]
    if r["memory_budget_mb"] is None:
        return r["h"]
    return choose_h(cfg["sampler"]["num_steps"], r["memory_budget_mb"], r["mem_backprop_step_mb"],
                    r["mem_zo_step_mb"])


def variant(cfg) -> str:
    r = cfg[CONFIG_SECTION]
    h = f"h={window_length(cfg)}" + (f"(budget={r['memory_budget_mb']:g}MB)" if r["memory_budget_mb"] else "")
    out = f"rlr/{h}/j={r['j_dist']}/zo={r['zo_samples']}x"
    if (r["ho_weight"], r["zo_weight"]) != (1.0, 1.0):
        out += f"/weights(ho={r['ho_weight']:g},zo={r['zo_weight']:g})"
    if r["ho_baseline"] != "loo":
        out += f"/baseline-{r['ho_baseline']}"
    return out + ("" if r["first_order"] else "/no-fo")


def validate(cfg) -> None:
    T = cfg["sampler"]["num_steps"]
    check_stochastic_sampler(cfg)  # the half-order term is a likelihood ratio on the sampler's noise
    if T < 2:
        raise BenchError("method rlr needs sampler.num_steps >= 2 (a last step and a half-order window)")
    h = window_length(cfg)
    if not 1 <= h <= T - 1:
        raise BenchError(f"rlr.h = {h}; accepted: 1..sampler.num_steps - 1 ({T - 1})")


def data_parallel(cfg, world: int) -> str | None:
    """Each process rolls out its rows; the three terms are averaged over the processes before the norms (the window
    distribution) and the update, the LOO baseline pools the whole batch: any config."""
    return None


# ---- the estimator (the same functions run the analytic chain in tests/test_rlr.py) -----------------

@dataclasses.dataclass
class Rollout:
    """One batch of trajectories, no gradients: states x_0 (noise) .. x_T (sampling order), the noise
    z_k of every step (None where a step is deterministic) and the final rewards (B,)."""
    xs: list[torch.Tensor]
    noises: list[torch.Tensor | None]
    rewards: torch.Tensor
    batch_rewards: torch.Tensor | None = None  # several processes: the whole batch's rewards (the LOO baseline's
    rows: slice | None = None                   # pool) and this process's rows of it; None: ``rewards`` is the batch
    log_probs: list[torch.Tensor] | None = None  # each step's log-prob as sampled (element sum), for the ratio check


# A chain is any object with
#     num_steps                       T
#     params                          the trainable tensors
#     std(k)                          sigma_k of step k
#     step_mean(k, x)                 mu_k(x; theta), differentiable in params
#     reward(x)                       R of final states (B,), differentiable
#     replay_rewards(ro, steps, u, s) R of ro's noise re-run with params + s u in ``steps`` (no gradients)

def straight_through(value: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """x_{k+1} = mu + sigma z with the recorded z: the stored value, with the gradient of the mean."""
    return value + (mean - mean.detach())


def first_order_surrogate(chain, ro: Rollout) -> torch.Tensor:
    """Its gradient: FO, the reward backpropagated through the last step only (its input detached)."""
    k = chain.num_steps - 1
    x0 = straight_through(ro.xs[k + 1], chain.step_mean(k, ro.xs[k]))
    return chain.reward(x0).mean()


def leave_one_out_mean(r: torch.Tensor) -> torch.Tensor:
    n = r.shape[0]
    return (r.sum() - r) / (n - 1) if n > 1 else torch.zeros_like(r)


def half_order_surrogate(chain, ro: Rollout, start: int, h: int, baseline: str = "loo",
                         diagnostics: dict | None = None) -> torch.Tensor:
    """Its gradient: HO for the window start..start+h-1, an h-step local backprop from the detached
    x_start times the likelihood ratio of the noise of the window's last step.  ``diagnostics``, a dict, gets
    ``ratio_dev``: max |p_theta / p_sampled - 1| of that step's transition, which must be 1 before any update (the
    recomputed log-prob is the sampled one's; a half-precision recomputation that drifts shows here)."""
    x = ro.xs[start]
    for k in range(start, start + h - 1):
        x = straight_through(ro.xs[k + 1], chain.step_mean(k, x))
    k = start + h - 1
    lp = gaussian_log_prob(ro.xs[k + 1], chain.step_mean(k, x), chain.std(k), "sum")
    if diagnostics is not None and ro.log_probs is not None:
        diagnostics["ratio_dev"] = float((torch.exp(lp.detach() - ro.log_probs[k].to(lp)) - 1).abs().max())
    pool = ro.rewards if ro.batch_rewards is None else ro.batch_rewards
    b = leave_one_out_mean(pool) if baseline == "loo" else torch.zeros_like(pool)
    b = b if ro.rows is None else b[ro.rows]
    return ((ro.rewards - b).to(lp) * lp).mean()


def zeroth_order_estimate(chain, ro: Rollout, steps, samples: int, eps: float,
                          generator: torch.Generator) -> tuple[list[torch.Tensor], list[float]]:
    """ZO for the given steps: two-point parameter perturbations along u ~ N(0, I), projected back
    along u.  Returns the estimate and each direction's finite difference (dR/ds along u)."""
    est = [torch.zeros_like(p) for p in chain.params]
    diffs = []
    if not steps or samples == 0:
        return est, diffs
    for _ in range(samples):
        u = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in chain.params]
        plus = chain.replay_rewards(ro, steps, u, eps)
        minus = chain.replay_rewards(ro, steps, u, -eps)
        d = float((plus - minus).double().mean()) / (2 * eps)
        diffs.append(d)
        for e, ui in zip(est, u):
            e.add_(ui, alpha=d / samples)
    return est, diffs


def gradient(surrogate: torch.Tensor, params) -> list[torch.Tensor]:
    grads = torch.autograd.grad(surrogate, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def window_starts(num_steps: int, h: int) -> int:
    """How many windows of h steps fit before the last step (starts 0 .. T-1-h)."""
    return num_steps - h


def step_sets(num_steps: int, start: int, h: int, first_order: bool = True) -> tuple[list[int], list[int]]:
    """(window, zeroth-order set): the window start..start+h-1 and every other step but the FO one."""
    window = list(range(start, start + h))
    fo = {num_steps - 1} if first_order else set()
    return window, [k for k in range(num_steps) if k not in window and k not in fo]


def window_probs(norms: list[float | None], dist: str, temperature: float = 1.0) -> torch.Tensor:
    """q(j): softmax over norm_j / (temperature x mean norm); unseen windows take the mean; or uniform."""
    n = len(norms)
    seen = [v for v in norms if v is not None]
    if dist == "uniform" or not seen:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    mean = sum(seen) / len(seen)
    v = torch.tensor([mean if x is None else x for x in norms], dtype=torch.float64)
    return torch.softmax(v / (temperature * mean if mean > 0 else 1.0), 0)


def rlr_estimate(chain, ro: Rollout, start: int, h: int, zo_samples: int, zo_eps: float,
                 generator: torch.Generator, first_order: bool = True, baseline: str = "loo") -> dict:
    """The paper's estimate of grad E[R], term by term (each a list shaped like chain.params, ascent
    direction), plus the step sets and the ZO finite differences."""
    T = chain.num_steps
    window, zo_steps = step_sets(T, start, h, first_order)
    terms = {}
    if first_order:
        terms["first_order"] = gradient(first_order_surrogate(chain, ro), chain.params)
    diagnostics = {}
    terms["half_order"] = gradient(half_order_surrogate(chain, ro, start, h, baseline, diagnostics), chain.params)
    terms["zeroth_order"], diffs = zeroth_order_estimate(chain, ro, zo_steps, zo_samples, zo_eps, generator)
    return {"terms": terms, "window": window, "zo_steps": zo_steps, "zo_diffs": diffs, **diagnostics}


# ---- the diffusion model as a chain ------------------------------------------------------------------

class DiffusionChain:
    """The guided DDIM sampler on one batch of prompts, seen as a chain for the estimator."""

    def __init__(self, ctx, prompts: list[str], checkpointing: bool = True, batch: int | None = None):
        """``prompts``: this process's rows of a batch of ``batch`` (default: all of it, one process)."""
        s = ctx.cfg.sampler
        self.batch = batch or len(prompts)
        self.ctx, self.pipe, self.prompts = ctx, ctx.pipe, prompts
        self.num_steps, self.guidance, self.eta = s.num_steps, s.guidance, s.eta
        self.params = ctx.trainable
        self.checkpointing = checkpointing
        self.cond, self.uncond = embed(self.pipe, prompts, s.guidance)
        self.timesteps = set_timesteps(self.pipe.scheduler, s.num_steps)

    def rollout(self, x_T: torch.Tensor) -> Rollout:
        g = self.ctx.step_generator(self.batch)
        x = x_T * process.init_noise_sigma(self.pipe.scheduler)
        noises = [step_noise(x, g) for _ in range(self.num_steps)]
        log_probs = []
        xs = [x] + replay_chain(self.pipe, x, noises, self.cond, self.uncond, self.num_steps, self.guidance,
                                self.eta, costs=self.ctx.costs, log_probs=log_probs, reduction="sum")
        with torch.no_grad():
            images = self.pipe.decode(xs[-1])
        self.ctx.costs.images += x.shape[0]
        r = self.ctx.score(images, self.prompts).detach()
        if self.ctx.world == 1:
            return Rollout(xs, noises, r, log_probs=log_probs)
        return Rollout(xs, noises, r, self.ctx.gather(r), self.ctx.rows(self.batch), log_probs=log_probs)

    def std(self, k: int) -> float:
        return float(step_std(self.pipe.scheduler, int(self.timesteps[k]), self.num_steps, self.eta))

    def step_mean(self, k: int, x: torch.Tensor) -> torch.Tensor:
        t = self.timesteps[k]
        eps = guided_eps(self.pipe.unet, x, t, self.cond, self.uncond, self.guidance, self.ctx.costs, with_grad=True,
                         checkpointing=self.checkpointing)
        return process.step(self.pipe.scheduler, eps, t, x, self.num_steps, self.eta).mean

    def reward(self, x: torch.Tensor) -> torch.Tensor:
        # the rollout's own images again, now with gradients: not a new reward query
        return self.ctx.reward(self.pipe.decode(x), self.prompts)

    def replay_rewards(self, ro: Rollout, steps, direction, scale: float) -> torch.Tensor:
        start = min(steps)
        xs = replay_chain(self.pipe, ro.xs[start], ro.noises, self.cond, self.uncond, self.num_steps,
                          self.guidance, self.eta, start=start, perturb_steps=steps, params=self.params,
                          direction=direction, scale=scale, costs=self.ctx.costs)
        with torch.no_grad():
            images = self.pipe.decode(xs[-1])
        self.ctx.costs.images += images.shape[0]
        return self.ctx.score(images, self.prompts).detach()


def _norm(vs: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in vs))


def _linear_surrogate(params, grads) -> torch.Tensor:
    """sum <p, g>: backpropagating it puts g into p.grad through the accelerator (gradient scaling)."""
    return sum((p * g.to(p.dtype)).sum() for p, g in zip(params, grads))


# ---- the methods ----------------------------------------------------------------------------------

class Method:
    """``rlr``: one update = one batch, FO + HO + ZO, one optimizer step."""

    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.method_cfg
        c = self.cfg
        if c.first_order and not ctx.reward.differentiable:
            raise BenchError(f"method 'rlr' backpropagates its first-order term through the reward, but reward "
                             f"{ctx.cfg.reward!r} is not differentiable; accepted: a differentiable reward, or "
                             "rlr.first_order=false (the last step then joins the zeroth-order set)")
        self.opt = ctx.adamw()
        self.h = window_length(ctx.cfg)
        self.norms: list[float | None] = [None] * window_starts(ctx.cfg.sampler.num_steps, self.h)

    def step(self) -> dict:
        ctx, c = self.ctx, self.cfg
        prompts, x_T, _ = ctx.batch(c.batch_size)  # the chain draws its step noise from the step generator itself
        chain = DiffusionChain(ctx, prompts, c.checkpointing, c.batch_size)
        ro = chain.rollout(x_T)
        q = window_probs(self.norms, c.j_dist, c.j_temperature)
        start = int(torch.multinomial(q, 1, generator=ctx.generator))
        est = rlr_estimate(chain, ro, start, self.h, c.zo_samples, c.zo_eps, ctx.generator, c.first_order,
                           c.ho_baseline)
        terms = {name: ctx.mean_tensors(g) for name, g in est["terms"].items()}  # the whole batch's terms
        weight = {"first_order": 1.0, "half_order": c.ho_weight, "zeroth_order": c.zo_weight}
        total = [sum(weight[name] * g[i] for name, g in terms.items()) for i in range(len(chain.params))]
        ctx.backward(-c.loss_coeff * _linear_surrogate(chain.params, total))
        grad_norm = ctx.clip_grad(c.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        ho = _norm(terms["half_order"])
        old = self.norms[start]
        self.norms[start] = ho if old is None else c.j_ema * old + (1 - c.j_ema) * ho
        r = (ro.rewards if ro.batch_rewards is None else ro.batch_rewards).float().cpu()
        dirderiv = sum(est["zo_diffs"]) / len(est["zo_diffs"]) if est["zo_diffs"] else float("nan")
        out = {"reward_mean": float(r.mean()), "reward_std": float(r.std()), "grad_norm": grad_norm,
               "window_start": start, "window_prob": float(q[start]),
               "ho_norm": ho, "zo_norm": _norm(terms["zeroth_order"]), "zo_dirderiv": dirderiv}
        if "first_order" in terms:
            out["fo_norm"] = _norm(terms["first_order"])
        if "ratio_dev" in est:
            out["ratio_dev_first"] = est["ratio_dev"]
        return out

    def state_dict(self) -> dict:
        return {"optimizer": self.opt.state_dict(), "norms": list(self.norms)}

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.norms = list(state["norms"])
