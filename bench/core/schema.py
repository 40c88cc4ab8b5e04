"""The config schema: the type and range of every key of the common config and of every method's section.

``check(cfg)`` runs in ``bench.core.config.resolve`` after the merge (which has already refused unknown keys and values
of the wrong type) and before the method's own ``validate`` (which checks how keys relate, e.g. a batch that must
divide another).  A bad value ends with one line naming the key, the value and what is accepted.  The rules:

- counts (``Int``): integers in a stated range; sizes and step counts >= 1, skips and warm-ups >= 0, every upper
  bound finite (a million steps, 65,536 per batch) so a typo of a few zeros is caught;
- reals (``Real``): finite numbers (NaN and infinity refused) in a stated range, open or closed at each end:
  learning rates and epsilons > 0, weights and coefficients >= 0, probabilities and fractions in [0, 1];
- ``Choice``: one of a listed set; ``Text``: a non-empty string (or empty where stated); ``TextList``: a list of
  non-empty strings; ``Betas``: AdamW's two betas in [0, 1); ``Maybe(rule)``: null or what ``rule`` accepts.

A key of a method's section without a rule here is an error of the schema itself (tests/bench/test_schema.py
checks every key of every method), so a new key cannot skip validation.
"""
from __future__ import annotations

import dataclasses
import functools
import math

from bench.core.fd import AT as FD_AT
from bench.core.fd import FEATURES as FD_FEATURES
from diffalign.adversarial import ADV_LOSSES
from diffalign.errors import BenchError
from methods import METHODS, alignprop, dde, ddpo, dpok, method_module, rlr

MAX_COUNT = 1_000_000
MAX_BATCH = 65_536


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

    def error(self, v) -> str | None:
        ok = (isinstance(v, list) and v and len(set(v)) == len(v)
              and all(isinstance(x, int) and not isinstance(x, bool) and self.lo <= x <= self.hi for x in v))
        return None if ok else f"a non-empty list of distinct integers in {self.lo}..{self.hi}"


@dataclasses.dataclass(frozen=True)
class Maybe:
    rule: object

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

COMMON = {
    "method": Text(), "model": Text(), "judge": Maybe(Text()), "reward": Text(), "train_prompts": Text(),
    "eval_prompts": Text(), "seed": Int(0, 2 ** 31 - 1), "steps": Int(1), "device": Choice(("auto", "cpu", "cuda")),
    "mixed_precision": Choice(("no", "fp16", "bf16")), "threads": Int(0, 1024),
    "lora.rank": Int(1, 1024), "lora.alpha": POSITIVE, "lora.init": Choice(("gaussian",)),
    "lora.targets": TextList(empty=False),
    "sampler.num_steps": Int(1, 1000), "sampler.guidance": Real(0.0, 100.0), "sampler.eta": Real(0.0, 1.0),
    "eval.every": Int(1), "eval.num_seeds": Int(2, 4096), "eval.num_steps": Int(1, 1000),
    "eval.guidance": Real(0.0, 100.0), "eval.grid_every": Int(1), "eval.kl_seeds": Int(0, 4096),
    "eval.metrics": TextList(), "checkpoint_every": Int(1), "tag": Text(empty=True), "trackers": TextList(),
    "variant": Text(), "method_key": Text(), "finetune": Choice(("lora", "full")),
    "nan_policy": Choice(("skip", "stop")), "nan_patience": Int(1, MAX_COUNT),
    "eval.fd.nfe": IntList(1, 1000), "eval.fd.features": Choice(FD_FEATURES), "eval.fd.real": Text(),
    "eval.fd.real_per_prompt": Int(2, 100_000), "eval.fd.at": Choice(FD_AT),
    "eval.fd.inception_weights": Text(empty=True),
}

# Keys that several methods share, by name; a section's own keys below by full name win.
SHARED = {
    "batch_size": BATCH, "grad_accum": Int(1, 4096), "lr": LR, "weight_decay": Real(0.0, 10.0), "adam_betas": Betas(),
    "adam_eps": Real(0.0, 1.0, lo_open=True), "grad_clip": POSITIVE, "loss_coeff": POSITIVE, "checkpointing": Flag(),
    "logprob_reduction": Choice(("mean", "sum")), "skip_first_steps": Int(0, 1000), "skip_last_steps": Int(0, 1000),
    "clip_range": POSITIVE, "adv_clip": POSITIVE, "beta": POSITIVE,
    # the preference methods' pair keys (diffalign.preference.PAIR_DEFAULTS)
    "pairs": Text(), "samples_per_prompt": Int(2, 1024), "pool_prompts": Int(1, MAX_COUNT),
    "prompts_per_step": Int(1, MAX_BATCH), "tie_threshold": NONNEG, "label_noise": Real(0.0, 0.5, hi_open=True),
}


@functools.lru_cache(maxsize=1)
def _section_rules() -> dict[str, dict[str, object]]:
    """section -> key -> rule, for every method's section (the choices come from the methods' own lists)."""
    own = {
        "alignprop": {"reward_target": Maybe(Real(-math.inf)), "truncation": Choice(alignprop.TRUNCATIONS),
                      "k_dist": Choice(alignprop.K_DISTS), "k": Int(1, 1000), "k_mean": Maybe(POSITIVE),
                      "k_std": Maybe(NONNEG)},
        "ddpo": {"estimator": Choice(ddpo.ESTIMATORS), "samples_per_step": BATCH, "prompts_per_step": Int(0, MAX_BATCH),
                 "sample_batch_size": BATCH, "train_batch_size": BATCH, "inner_epochs": Int(1, 1000),
                 "timestep_fraction": Real(0.0, 1.0, lo_open=True), "per_prompt_stats": Flag(),
                 "stat_buffer": Int(1, MAX_COUNT), "stat_min_count": Int(1, MAX_COUNT)},
        "dpok": {"g_batch": BATCH, "p_step": Int(1, 10_000), "p_batch": BATCH, "buffer_size": Int(1, 10 * MAX_COUNT),
                 "ratio_clip": POSITIVE, "reward_weight": NONNEG, "kl_weight": NONNEG, "kl_warmup": Int(0, MAX_COUNT),
                 "baseline": Choice(dpok.BASELINES), "v_lr": LR, "v_steps": Int(1, 10_000), "v_batch": BATCH},
        "rlr": {"h": Int(1, 1000), "memory_budget_mb": Maybe(POSITIVE), "mem_backprop_step_mb": POSITIVE,
                "mem_zo_step_mb": POSITIVE, "j_dist": Choice(rlr.J_DISTS), "j_temperature": POSITIVE,
                "j_ema": Real(0.0, 1.0, hi_open=True), "zo_samples": Int(0, 10_000), "zo_eps": POSITIVE,
                "first_order": Flag(), "ho_baseline": Choice(rlr.HO_BASELINES), "ho_weight": NONNEG,
                "zo_weight": NONNEG},
        "rlr_code": {"chain_len": Int(0, 1000), "ho_loss_coeff": NONNEG},
        "diffusion_dpo": {},
        "ogdm": {"data": Text(), "caption_dropout": FRACTION, "gamma": Real(0.0, 1e6), "k": FRACTION,
                 "adv_loss": Choice(ADV_LOSSES), "r1_weight": Real(0.0, 1e6), "d_lr": LR, "d_channels": Int(1, 4096),
                 "d_blocks": Int(1, 12), "baseline_run": Flag()},
        "dde": {"weighting": Choice(dde.WEIGHTINGS), "split": Real(0.0, 1.0, lo_open=True, hi_open=True),
                "single_shot_var": Choice(dde.SINGLE_SHOT_VARS), "data_std": POSITIVE,
                "t_sampling": Choice(dde.T_SAMPLINGS)},
    }
    out = {}
    for name in METHODS:
        module = method_module(name)
        section = module.CONFIG_SECTION
        rules = {}
        for key in module.DEFAULTS:
            rule = own.get(section, {}).get(key) or SHARED.get(key)
            if rule is None:
                raise RuntimeError(f"bench/core/schema.py has no rule for {section}.{key}")  # a defect, not bad input
            rules[key] = rule
        out[section] = rules
    return out


def rules_for(section: str) -> dict[str, object]:
    return _section_rules()[section]


def check(cfg: dict, section: str) -> None:
    """One ``BenchError`` line for the first key of the common config or of ``section`` whose value breaks its rule."""
    for key, rule in COMMON.items():
        parts = key.split(".")
        node = cfg
        for p in parts:
            if not isinstance(node, dict) or p not in node:
                node = _ABSENT
                break
            node = node[p]
        if node is _ABSENT:
            continue
        _check_one(key, node, rule)
    for key, rule in rules_for(section).items():
        _check_one(f"{section}.{key}", cfg[section][key], rule)


_ABSENT = object()


def _check_one(key: str, value, rule) -> None:
    e = rule.error(value)
    if e is not None:
        raise BenchError(f"config key {key!r} = {value!r}; accepted: {e}")
