"""The config schema: the type and range of every key of the common config; each method's section is checked against
the rules its own file declares (``RULES``, from the ground floor's rule types in ``diffalign/contract.py``), so this
file imports no method.

``check(cfg, section, rules)`` runs in ``bench.core.config.resolve`` after the merge (which has already refused
unknown keys and values of the wrong type) and before the method's own ``validate`` (which checks only how keys
relate, e.g. a batch that must divide another).  A bad value ends with one line naming the key, the value and what is
accepted.  The rules:

- counts (``Int``): integers in a stated range; sizes and step counts >= 1, skips and warm-ups >= 0, every upper
  bound finite (a million steps, 65,536 per batch) so a typo of a few zeros is caught;
- reals (``Real``): finite numbers (NaN and infinity refused) in a stated range, open or closed at each end:
  learning rates and epsilons > 0, weights and coefficients >= 0, probabilities and fractions in [0, 1];
- ``Choice``: one of a listed set; ``Text``: a non-empty string (or empty where stated); ``TextList``: a list of
  non-empty strings; ``Betas``: AdamW's two betas in [0, 1); ``Maybe(rule)``: null or what ``rule`` accepts.

A key of a method's section without a rule is a defect of the method file: ``diffalign.contract.rules`` raises when
the file is imported, and tests/methods/test_contract.py checks every registered method.
"""
from __future__ import annotations

from bench.core.fd import AT as FD_AT
from bench.core.fd import FEATURES as FD_FEATURES
from diffalign.contract import MAX_COUNT, POSITIVE, Choice, Int, IntList, Maybe, Real, Text, TextList
from diffalign.errors import BenchError

COMMON = {
    "method": Text(), "model": Text(), "judge": Maybe(Text()), "reward": Text(), "train_prompts": Text(),
    "eval_prompts": Text(), "seed": Int(0, 2 ** 31 - 1), "steps": Int(1), "device": Choice(("auto", "cpu", "cuda")),
    "mixed_precision": Choice(("no", "fp16", "bf16")), "threads": Int(0, 1024),
    "lora.rank": Int(1, 1024), "lora.alpha": POSITIVE, "lora.init": Choice(("gaussian",)),
    "lora.targets": TextList(empty=False),
    "sampler.num_steps": Int(1, 1000), "sampler.guidance": Real(0.0, 100.0), "sampler.eta": Real(0.0, 1.0),
    "eval.every": Int(1), "eval.at": IntList(1, 10 ** 9, empty=True), "eval.num_seeds": Int(2, 4096),
    "eval.first_seed": Int(0, 2 ** 31 - 4097), "eval.num_steps": Int(1, 1000),
    "eval.guidance": Real(0.0, 100.0), "eval.grid_every": Int(1), "eval.kl_seeds": Int(0, 4096),
    "eval.metrics": TextList(), "checkpoint_every": Int(1), "tag": Text(empty=True), "trackers": TextList(),
    "variant": Text(), "method_key": Text(), "finetune": Choice(("lora", "full")),
    "nan_policy": Choice(("skip", "stop")), "nan_patience": Int(1, MAX_COUNT),
    "eval.fd.nfe": IntList(1, 1000), "eval.fd.features": Choice(FD_FEATURES), "eval.fd.real": Text(),
    "eval.fd.real_per_prompt": Int(2, 100_000), "eval.fd.at": Choice(FD_AT),
    "eval.fd.inception_weights": Text(empty=True),
    "remote.timeout_s": Real(0.0, 3600.0, lo_open=True), "remote.backoff_s": Real(0.0, 600.0, lo_open=True),
    "remote.backoff_max_s": Real(0.0, 3600.0, lo_open=True), "remote.max_wait_s": Real(0.0, 7 * 86400.0),
    "remote.encoding": Choice(("f32", "u8", "png")),
}

def check(cfg: dict, section: str, rules: dict) -> None:
    """One ``BenchError`` line for the first key of the common config, or of the method's ``section`` (its ``rules``:
    the method file's ``RULES``), whose value breaks its rule."""
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
    for key, rule in rules.items():
        _check_one(f"{section}.{key}", cfg[section][key], rule)


_ABSENT = object()


def _check_one(key: str, value, rule) -> None:
    e = rule.error(value)
    if e is not None:
        raise BenchError(f"config key {key!r} = {value!r}; accepted: {e}")
