"""Run configs: common defaults, a YAML preset per method, command-line overrides, validation.

Resolution order: ``COMMON`` below, then the method's own ``DEFAULTS`` (under its ``CONFIG_SECTION``),
then ``bench/presets/<method>.yaml``, then ``--set key=value`` overrides (dotted keys, YAML values).
Only keys that already exist can be set, and a value must have the type of its default, so a typo
is an error naming the key and what is accepted, never a silently ignored setting.

``resolve`` finishes the config: after validation it adds ``variant`` (the method's exact implementation
variant) and ``method_key`` (its config section), so ``config.yaml`` holds exactly what ran.
"""
from __future__ import annotations

import copy
import os

import yaml

from bench.core import schema
from diffalign.errors import BenchError
from diffalign.store import load_yaml
from methods import METHODS, method_module

PRESETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "presets")

COMMON: dict = {
    "method": None,
    "model": "models/tiny-t2i",      # diffusers folder or cached Hugging Face repo id
    "judge": "models/tiny-judge",    # prompt-fidelity judge (tiny world); null for full-scale models
    "reward": "tiny-aesthetic",
    "train_prompts": "tiny-train",
    "eval_prompts": "tiny-eval",
    "seed": 0,
    "steps": 30,
    "device": "auto",                # auto | cpu | cuda
    "mixed_precision": "no",         # no | fp16 | bf16 (frozen weights in that dtype; LoRA stays fp32)
    "threads": 0,                    # torch CPU threads; 0 = torch's default
    "finetune": "lora",              # lora (the adapter below) | full (every UNet weight, a frozen copy as reference)
    "nan_policy": "skip",            # a non-finite reward, loss or gradient norm: skip that update | stop the run
    "nan_patience": 3,               # skip: stop after this many consecutive skipped updates
    "lora": {"rank": 4, "alpha": 4.0, "init": "gaussian", "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
    "sampler": {"num_steps": 10, "guidance": 3.0, "eta": 0.0},  # the training sampler
    # evaluate every `every` steps, at the steps listed in `at` (a budget curve's points) and at the end
    # (the eval noise: seeds first_seed .. first_seed + num_seeds - 1)
    "eval": {"every": 10, "at": [], "first_seed": 0, "num_seeds": 8, "num_steps": 10, "guidance": 3.0,
             "grid_every": 10,
             "kl_seeds": 2,                # seeds of the KL-to-base estimate (0 = off); training sampler, eta 1
             "metrics": ["tiny-rating", "tiny-clip"],  # held-out rewards scored on the eval images, never trained on
             # (and "fd": the Frechet distance against NFE, bench/core/fd.py, with these settings)
             "fd": {"nfe": [3, 5, 10, 20], "features": "auto", "real": "tiny-world", "real_per_prompt": 64,
                    "at": "ends", "inception_weights": ""}},
    "checkpoint_every": 5,
    "tag": "",
    "trackers": [],                  # optional mirrors of the metrics: tensorboard, wandb (the store stays the truth)
    # a reward served by another process (--reward http://HOST:PORT, docs/reward-server.md): one request's timeout,
    # the first back-off (doubling up to backoff_max_s), the bound on how long one reward call waits before the run
    # checkpoints its last whole step and exits, and how images travel (f32: exact, the in-process scores)
    "remote": {"timeout_s": 60.0, "backoff_s": 0.5, "backoff_max_s": 10.0, "max_wait_s": 300.0, "encoding": "f32"},
}
# Keys added after runs were committed to the store.  At these values a config means exactly what it meant before
# the key existed (the code behaved so), so a run's identity (``identity``, the sweep hash) leaves them out and the
# committed runs keep their identity.  ``eval.fd`` only matters when "fd" is in eval.metrics.
LATER_KEYS = {("finetune",): "lora", ("nan_policy",): "skip", ("nan_patience",): 3,
              ("remote",): COMMON["remote"], ("eval", "at"): [], ("eval", "first_seed"): 0}


def identity(cfg: dict) -> dict:
    """The part of a resolved config that makes a run what it is: the harness's own additions (variant,
    method_key), the trackers (mirrors of the metrics) and later keys at their neutral values left out."""
    plain = copy.deepcopy({k: v for k, v in dict(cfg).items() if k not in ("variant", "method_key", "trackers")})
    for path, neutral in LATER_KEYS.items():
        node = plain
        for p in path[:-1]:
            node = node.get(p, {})
        if node.get(path[-1], neutral) == neutral:
            node.pop(path[-1], None)
    if "fd" not in (plain.get("eval", {}).get("metrics") or []):
        plain.get("eval", {}).pop("fd", None)
    return plain


class Config(dict):
    """A nested dict with attribute access for reading (``cfg.sampler.num_steps``)."""

    def __getattr__(self, key):
        try:
            value = self[key]
        except KeyError:
            raise AttributeError(key) from None
        return Config(value) if isinstance(value, dict) else value


def _merge(base: dict, over: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        key = f"{where}{k}"
        if k not in out:
            raise _unknown_key(key, where, out)
        if isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise BenchError(f"config key {key!r} must be a mapping with keys {', '.join(sorted(out[k]))}")
            out[k] = _merge(out[k], v, key + ".")
        else:
            out[k] = _check_type(key, out[k], v)
    return out


def _unknown_key(key: str, where: str, out: dict) -> BenchError:
    """The error of a key that is not in the config: another method's section says whose it is."""
    if not where and out.get("method") in METHODS:
        owners = sorted(m for m in METHODS if method_module(m).CONFIG_SECTION == key)
        if owners:
            own = method_module(out["method"]).CONFIG_SECTION
            return BenchError(f"config section {key!r} belongs to method {', '.join(owners)}; this run's method is "
                              f"{out['method']} (section {own!r})")
    return BenchError(f"unknown config key {key!r}; accepted: {', '.join(sorted(f'{where}{x}' for x in out))}")


def _check_type(key: str, default, value):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        if isinstance(value, bool):  # YAML 1.1 reads a bare no / off / yes / on as a boolean (mixed_precision=no)
            value = "yes" if value else "no"
        ok = isinstance(value, str)
    elif isinstance(default, list):
        ok = isinstance(value, list)
    else:
        ok = True
    if not ok:
        kind = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
                "list": "a list"}.get(type(default).__name__, type(default).__name__)
        raise BenchError(f"config key {key!r} = {value!r}; accepted: {kind} (the default is {default!r})")
    return value


def parse_override(text: str) -> dict:
    """'alignprop.lr=1e-3' -> {'alignprop': {'lr': 0.001}}"""
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise BenchError(f"bad override {text!r}; accepted: KEY=VALUE with a dotted key, e.g. alignprop.lr=1e-3")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise BenchError(f"bad override {text!r}: {raw!r} is not a YAML value") from None
    if isinstance(value, str) and _looks_numeric(value):
        value = float(value)  # YAML 1.1 reads '1e-3' as a string
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def resolve(method: str, overrides: list[str] | None = None, preset: str | None = None) -> Config:
    """The run config of ``method``: defaults, preset, overrides, validated, with its variant named."""
    module = method_module(method)
    base = copy.deepcopy(COMMON)
    base["method"] = method
    base[module.CONFIG_SECTION] = copy.deepcopy(module.DEFAULTS)
    preset = preset or os.path.join(PRESETS, f"{method}.yaml")
    if os.path.isfile(preset):
        data = load_yaml(preset, "preset", "a YAML mapping of config keys") or {}
        if not isinstance(data, dict):
            raise BenchError(f"preset {preset!r} holds a YAML {type(data).__name__}, not a mapping; accepted: a YAML "
                             "mapping of config keys")
        data.pop("method", None)
        base = _merge(base, data)
    elif preset != os.path.join(PRESETS, f"{method}.yaml"):
        raise BenchError(f"preset file {preset!r} does not exist; accepted: a YAML file of config keys")
    for text in overrides or []:
        base = _merge(base, parse_override(text))
    validate(base, module)
    return Config({**base, "variant": variant_of(base, module), "method_key": module.CONFIG_SECTION})


def validate(cfg: dict, module) -> None:
    schema.check(cfg, module.CONFIG_SECTION, module.RULES)  # every key's type and range (bench/core/schema.py)
    r = cfg.get("remote") or {}
    if r and r["backoff_max_s"] < r["backoff_s"]:
        raise BenchError(f"remote.backoff_max_s = {r['backoff_max_s']:g} is below remote.backoff_s = "
                         f"{r['backoff_s']:g}; accepted: backoff_max_s >= backoff_s")
    if not 0 <= cfg["eval"]["kl_seeds"] <= cfg["eval"]["num_seeds"]:
        raise BenchError(f"eval.kl_seeds = {cfg['eval']['kl_seeds']}; accepted: 0 (off) .. eval.num_seeds")
    module.validate(cfg)  # how the method's keys relate (each key's range is its RULES')


def derive(cfg: dict, overrides: list[str]) -> Config:
    """A resolved config with more overrides applied (a companion run of the same settings), validated and with its
    variant named anew."""
    module = method_module(cfg["method"])
    base = {k: v for k, v in copy.deepcopy(dict(cfg)).items() if k not in ("variant", "method_key")}
    for text in overrides:
        base = _merge(base, parse_override(text))
    validate(base, module)
    return Config({**base, "variant": variant_of(base, module), "method_key": module.CONFIG_SECTION})


def variant_of(cfg: dict, module) -> str:
    """The method's variant, with ``/full-finetune`` when every UNet weight is trained."""
    name = module.variant(cfg)
    return name + "/full-finetune" if cfg.get("finetune", "lora") == "full" else name


# The short configuration: the method's own preset, shrunk to a few steps and a cheap evaluation, and the method's
# own smoke settings (its file's ``SMOKE[name]``).
SHORT_COMMON = ["steps=4", "eval.every=2", "eval.grid_every=4", "checkpoint_every=4", "eval.num_seeds=2",
                "eval.kl_seeds=1", "threads=1"]


def short_overrides(method: str, extra: list[str] | None = None) -> list[str]:
    """The short configuration of ``method`` (bench regress's, the tests', the GPU check's), then ``extra``."""
    return SHORT_COMMON + method_module(method).SMOKE[method] + list(extra or [])
