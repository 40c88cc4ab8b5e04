"""The method contract, in one place: what a method module declares, what its ``Method`` offers, and what the
harness hands it.  Protocols, not base classes (as torchtune's recipe interface): a method is a plain module that
satisfies ``MethodModule``; nothing inherits from anything here.

A method module (``methods/<name>.py``) declares, top to bottom:

    CONFIG_SECTION   its section in the run config (``cfg.<CONFIG_SECTION>``)
    DEFAULTS         that section's defaults, scaled to the tiny world
    RULES            one rule per key of DEFAULTS (``rules(DEFAULTS, own)``: its own rules, the shared ones by name)
    NEEDS_DIFFERENTIABLE_REWARD
    SMOKE            per name it is registered under: the overrides of its preset for ``bench regress``'s short run
    variant(cfg)     the exact implementation variant, recorded in every run's config and manifest
    validate(cfg)    cross-key checks only (one ``BenchError`` line); each key's type and range are ``RULES``'
    data_parallel(cfg, world)
                     None when the method splits its batches over ``world`` processes with this config, else the
                     reason it cannot (one clause; the harness adds the rest of the line)
    companion_baseline
                     None, or ``f(cfg) -> overrides | None``: a second run the harness adds beside this one (OGDM's
                     gamma = 0 baseline), into ``<run>/baseline``
    Method(ctx)      with ``step() -> dict`` (one optimizer update, its metrics), ``state_dict()``,
                     ``load_state_dict()``

``ctx`` satisfies ``MethodContext``: the pipeline with its LoRA, the reward, the prompts, the RNG and the cost
counters, and the few operations every method needs.  A method says what it computes over the global batch; the
context keeps each process's rows and gathers below it (``batch``: this process's rows of a sampling batch and its
step-noise generator; ``local`` / ``gather``: this process's rows of a global batch and back), and the metrics a
``step()`` returns are averaged over the processes by the harness, so a method never averages them itself.

``missing(module)`` lists what a module fails to declare (tests/methods/test_contract.py walks every registered
method with it).  The rule types (``Int``, ``Real``, ``Choice``, ...) live here too, so the harness's schema
(``bench/core/schema.py``) reads each method's ``RULES`` and imports no method.
"""
from __future__ import annotations

import dataclasses
import math
import types
from typing import Any, Callable, Protocol, runtime_checkable

import torch

MAX_COUNT = 1_000_000
MAX_BATCH = 65_536


# ---- the rules: each returns None for an accepted value, else what is accepted (for the one error line) -----------


class Rule(Protocol):
    def error(self, v) -> str | None: ...


@dataclasses.dataclass(frozen=True)
class Int:
    lo: int = 1
    hi: int = MAX_COUNT

    def error(self, v) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"an integer in {self.lo}..{self.hi}"
        return None if self.lo <= v <= self.hi else f"an integer in {self.lo}..{self.hi}"


@dataclasses.dataclass(frozen=True)
class Real:
    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False

    def accepted(self) -> str:
        left = "(" if self.lo_open else "["
        right = ")" if self.hi_open or math.isinf(self.hi) else "]"
        hi = "inf" if math.isinf(self.hi) else f"{self.hi:g}"
        return f"a finite number in {left}{self.lo:g}, {hi}{right}"

    def error(self, v) -> str | None:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return self.accepted()
        ok_lo = v > self.lo if self.lo_open else v >= self.lo
        ok_hi = v < self.hi if self.hi_open else v <= self.hi
        return None if ok_lo and ok_hi else self.accepted()


@dataclasses.dataclass(frozen=True)
class Choice:
    values: tuple

    def error(self, v) -> str | None:
        return None if v in self.values else ", ".join(map(str, self.values))


@dataclasses.dataclass(frozen=True)
class Text:
    empty: bool = False

    def error(self, v) -> str | None:
        if not isinstance(v, str) or (not v.strip() and not self.empty):
            return "a string" if self.empty else "a non-empty string"
        return None


@dataclasses.dataclass(frozen=True)
class TextList:
    empty: bool = True

    def error(self, v) -> str | None:
        ok = isinstance(v, list) and all(isinstance(x, str) and x.strip() for x in v) and (v or self.empty)
        return None if ok else ("a list of non-empty strings" + ("" if self.empty else ", at least one"))


@dataclasses.dataclass(frozen=True)
class Betas:
    def error(self, v) -> str | None:
        ok = (isinstance(v, list) and len(v) == 2
              and all(not isinstance(b, bool) and isinstance(b, (int, float)) and 0 <= b < 1 for b in v))
        return None if ok else "a list of two betas, each in [0, 1)"


@dataclasses.dataclass(frozen=True)
class Flag:
    def error(self, v) -> str | None:
        return None if isinstance(v, bool) else "true or false"


@dataclasses.dataclass(frozen=True)
class IntList:
    lo: int = 1
    hi: int = 1000
    empty: bool = False

    def error(self, v) -> str | None:
        ok = (isinstance(v, list) and (v or self.empty) and len(set(v)) == len(v)
              and all(isinstance(x, int) and not isinstance(x, bool) and self.lo <= x <= self.hi for x in v))
        kind = "list" if self.empty else "non-empty list"
        return None if ok else f"a {kind} of distinct integers in {self.lo}..{self.hi}"


@dataclasses.dataclass(frozen=True)
class Maybe:
    rule: Any

    def error(self, v) -> str | None:
        if v is None:
            return None
        e = self.rule.error(v)
        return None if e is None else f"null or {e}"


POSITIVE = Real(0.0, lo_open=True)
NONNEG = Real(0.0)
FRACTION = Real(0.0, 1.0)
LR = Real(0.0, 10.0, lo_open=True)
BATCH = Int(1, MAX_BATCH)

# Keys several methods share, by name (a method's own rule for a key wins).  Counts have finite upper bounds (a
# million steps, 65,536 per batch) so a typo of a few zeros is caught; learning rates and epsilons are > 0.
SHARED_RULES = {
    "batch_size": BATCH, "grad_accum": Int(1, 4096), "lr": LR, "weight_decay": Real(0.0, 10.0), "adam_betas": Betas(),
    "adam_eps": Real(0.0, 1.0, lo_open=True), "grad_clip": POSITIVE, "loss_coeff": POSITIVE, "checkpointing": Flag(),
    "logprob_reduction": Choice(("mean", "sum")), "skip_first_steps": Int(0, 1000), "skip_last_steps": Int(0, 1000),
    "clip_range": POSITIVE, "adv_clip": POSITIVE, "beta": POSITIVE,
    # the preference methods' pair keys (diffalign.preference.PAIR_DEFAULTS)
    "pairs": Text(), "samples_per_prompt": Int(2, 1024), "pool_prompts": Int(1, MAX_COUNT),
    "prompts_per_step": Int(1, MAX_BATCH), "tie_threshold": NONNEG, "label_noise": Real(0.0, 0.5, hi_open=True),
}


def rules(defaults: dict, own: dict | None = None) -> dict[str, Rule]:
    """One rule per key of ``defaults``: the method's ``own`` rule, else the shared rule of that name.  A key with
    neither is a defect of the method file (it would skip validation), so it raises at import."""
    own = own or {}
    stray = set(own) - set(defaults)
    if stray:
        raise TypeError(f"rules for keys that are not in DEFAULTS: {sorted(stray)}")
    out = {}
    for key in defaults:
        rule = own.get(key) or SHARED_RULES.get(key)
        if rule is None:
            raise TypeError(f"no rule for key {key!r}: give it one in the method's RULES")
        out[key] = rule
    return out


# ---- the protocols ------------------------------------------------------------------------------------------------


@runtime_checkable
class Method(Protocol):
    """One optimizer update per ``step()``; its state (optimizers, buffers, trackers) checkpointed with the run."""

    def step(self) -> dict: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class MethodContext(Protocol):
    """What the harness hands a method (``bench.core.context.Context`` is the one implementation).

    The batch a method asks for is the global batch; with several processes each holds its own rows of it and
    the context gathers, shards and averages (with one process every one of these is the identity)."""

    cfg: Any                     # the resolved run config (attribute access)
    pipe: Any                    # the frozen pipeline with its LoRA
    reward: Any                  # the training reward: images, prompts -> scores
    train_prompts: list[str]
    generator: torch.Generator   # the run's RNG (checkpointed)
    costs: Any                   # the cost counters (images, reward queries, UNet passes)
    trainable: list[torch.nn.Parameter]

    @property
    def method_cfg(self) -> Any: ...           # the method's own section, cfg.<CONFIG_SECTION>

    @property
    def world(self) -> int: ...                # processes (1 without torchrun / accelerate launch)

    def draw_prompts(self, n: int, distinct: int = 0) -> list[str]: ...

    def noise(self, n: int) -> torch.Tensor: ...

    def batch(self, n: int, distinct: int = 0, prompts: list[str] | None = None) -> tuple[list[str], torch.Tensor,
                                                                                          Any]: ...

    def local(self, batch, strided: bool = False): ...

    def gather(self, t: torch.Tensor) -> torch.Tensor: ...

    def gather_trajectory(self, traj): ...

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor: ...

    def adamw(self) -> Any: ...

    def guard(self, opt: torch.optim.Optimizer) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def clip_grad(self, max_norm: float) -> float: ...


# What a method module must declare: name -> what it must be.
REQUIRED: dict[str, Callable[[Any], bool]] = {
    "CONFIG_SECTION": lambda v: isinstance(v, str) and v.isidentifier(),
    "DEFAULTS": lambda v: isinstance(v, dict),
    "RULES": lambda v: isinstance(v, dict) and all(callable(getattr(r, "error", None)) for r in v.values()),
    "NEEDS_DIFFERENTIABLE_REWARD": lambda v: isinstance(v, bool),
    "SMOKE": lambda v: isinstance(v, dict) and all(isinstance(o, list) and all(isinstance(s, str) and "=" in s
                                                                               for s in o) for o in v.values()),
    "variant": callable,
    "validate": callable,
    "data_parallel": callable,
    "companion_baseline": lambda v: v is None or callable(v),
    "Method": lambda v: isinstance(v, type) and all(callable(getattr(v, m, None))
                                                    for m in ("step", "state_dict", "load_state_dict")),
}


class MethodModule(Protocol):
    """A method's module, as the harness reads it (see the module docstring; ``REQUIRED`` checks it)."""

    CONFIG_SECTION: str
    DEFAULTS: dict
    RULES: dict
    NEEDS_DIFFERENTIABLE_REWARD: bool
    SMOKE: dict[str, list[str]]
    companion_baseline: Callable[[Any], list[str] | None] | None
    Method: type

    def variant(self, cfg) -> str: ...

    def validate(self, cfg) -> None: ...

    def data_parallel(self, cfg, world: int) -> str | None: ...


def missing(module: types.ModuleType, registered_as: list[str] | tuple = ()) -> list[str]:
    """What ``module`` fails to declare, one entry per item (empty: the contract is complete).  ``registered_as``:
    the names the registry gives it; each needs its SMOKE entry."""
    out = []
    for name, ok in REQUIRED.items():
        if not hasattr(module, name):
            out.append(f"{name}: not declared")
        elif not ok(getattr(module, name)):
            out.append(f"{name}: not of the contract's shape")
    if not out:
        if set(module.RULES) != set(module.DEFAULTS):
            out.append(f"RULES: keys differ from DEFAULTS ({sorted(set(module.RULES) ^ set(module.DEFAULTS))})")
        out += [f"SMOKE: no entry for {n!r}" for n in registered_as if n not in module.SMOKE]
    return out
