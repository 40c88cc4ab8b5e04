"""The reward registry: every reward maps a batch of images in [0, 1] and their prompts to scores.

A reward is any object with

    name: str
    differentiable: bool          # True if gradients flow from the score back to the images
    __call__(images, prompts) -> torch.Tensor of shape (B,)
    to(device) -> self            # optional: move the scorer's weights (called once by the harness)
    gold: str                     # optional: "fidelity" when the held-out judge's prompt fidelity is the metric
                                  # this reward is a proxy for (its run curve then draws the two together)

``images`` is a float tensor (B, 3, H, W) in [0, 1] on the run's device; ``prompts`` a list of B
strings.  Methods that backpropagate the reward (AlignProp, RLR) refuse a non-differentiable one.

A reward spec, as given to ``REWARD=`` / ``--reward``, is one of

    name                          a registered reward (``rewards.available()``)
    name:1.0,other:0.5            a weighted sum; each term is also reported on its own
    package.module:Class          a user's own reward class (constructed with no arguments), found
                                  on ``sys.path`` (the current directory is searched too)
    http://HOST:PORT              a reward served by another process (``remote:HOST:PORT`` too): scores only,
                                  never differentiable (``rewards/remote.py``, docs/reward-server.md)

Published reward models load only from local files or a pre-filled Hugging Face cache; see each
module for the files and the environment variable that points at them.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

import torch

from diffalign.errors import BenchError

# name -> "module:attribute"; modules are imported only when their reward is asked for
REGISTRY = {
    "jpeg-compressibility": "rewards.jpeg:JpegCompressibility",
    "jpeg-incompressibility": "rewards.jpeg:JpegIncompressibility",
    "saturation": "rewards.pixel:Saturation",
    # published reward models (weights from local paths or the Hugging Face cache)
    "aesthetic": "rewards.aesthetic:LaionAesthetic",
    "hpsv2": "rewards.hps:HPSv2",
    "hpsv2.1": "rewards.hps:HPSv21",
    "pickscore": "rewards.pickscore:PickScore",
    "clipscore": "rewards.clipscore:ClipScore",
    "imagereward": "rewards.imagereward:ImageReward",
    # the tiny world's own reward models (committed under models/)
    "tiny-clip": "rewards.tiny:TinyClip",
    "tiny-aesthetic": "rewards.tiny:TinyAesthetic",
    "tiny-count": "rewards.tiny:TinyCount",
    "tiny-rating": "rewards.tiny:TinyRating",   # the hidden rating tiny-aesthetic predicts (ground truth)
    "tiny-geneval": "rewards.geneval:TinyGenEval",          # GenEval's 0/1 rule (straight-through gradient)
    "tiny-geneval-soft": "rewards.geneval:TinyGenEvalSoft",  # its soft score: product of asked probabilities
}

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]*"
_WEIGHTED = re.compile(rf"^\s*({_NAME})\s*:\s*([-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?)\s*$")
_PLUGIN = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*:\s*([A-Za-z_]\w*)\s*$")


def available() -> list[str]:
    return sorted(REGISTRY)


def _accepted() -> str:
    return (f"accepted: {', '.join(available())}, a weighted sum like 'aesthetic:1.0,hpsv2:0.5', "
            "a class of your own as 'package.module:Class', or a reward server as http://HOST:PORT")


def _import_attr(target: str):
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def _registered(name: str):
    if name not in REGISTRY:
        raise BenchError(f"unknown reward {name!r}; {_accepted()}")
    return _import_attr(REGISTRY[name])()


def _plugin(module: str, cls: str):
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        raise BenchError(f"reward plug-in {module}:{cls}: cannot import module {module!r} ({e}); accepted: a module "
                         "on sys.path or in the current directory, as 'package.module:Class'") from None
    if not hasattr(mod, cls):
        raise BenchError(f"reward plug-in {module}:{cls}: module {module!r} has no attribute {cls!r}")
    reward = getattr(mod, cls)()
    missing = [a for a in ("differentiable",) if not hasattr(reward, a)] + ([] if callable(reward) else ["__call__"])
    if missing:
        raise BenchError(f"reward plug-in {module}:{cls} lacks {', '.join(missing)}; accepted: a class with "
                         "'differentiable: bool' and '__call__(images, prompts) -> tensor (B,)'")
    if not getattr(reward, "name", None):
        reward.name = f"{module}:{cls}"
    return reward


class WeightedSum:
    """``sum_i w_i * R_i(images, prompts)``; differentiable only if every term is.  After each call
    ``last_terms`` holds each term's scores (the harness logs them as ``reward/<name>``)."""

    def __init__(self, terms: list[tuple[object, float]]):
        self.terms = terms
        self.name = ",".join(f"{r.name}:{w:g}" for r, w in terms)
        self.differentiable = all(r.differentiable for r, _ in terms)
        self.last_terms: dict[str, torch.Tensor] = {}

    def to(self, device):
        for r, _ in self.terms:
            if hasattr(r, "to"):
                r.to(device)
        return self

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total, self.last_terms = 0.0, {}
        for r, w in self.terms:
            s = r(images, prompts)
            self.last_terms[r.name] = s.detach()
            total = total + w * s.to(images.device).float()
        return total


def get_reward(spec: str, remote: dict | None = None):
    """A reward from its spec (see the module docstring); ``remote``: a reward server's client settings (the run
    config's ``remote`` section: timeouts, back-off, the bound on waiting, the image encoding)."""
    if not isinstance(spec, str) or not spec.strip():
        raise BenchError(f"reward must be a non-empty string; {_accepted()}")
    spec = spec.strip()
    from rewards.remote import RemoteReward, is_remote_spec

    if is_remote_spec(spec):
        return RemoteReward(spec, remote)
    if spec in REGISTRY:
        return _registered(spec)
    parts = [p for p in spec.split(",")]
    if len(parts) > 1 or _WEIGHTED.match(spec):
        terms = []
        for p in parts:
            m = _WEIGHTED.match(p)
            if not m:
                raise BenchError(f"bad reward term {p.strip()!r} in {spec!r}; accepted: NAME:WEIGHT terms joined by "
                                 "commas, e.g. 'aesthetic:1.0,hpsv2:0.5'")
            terms.append((get_reward(m.group(1)), float(m.group(2))))
        names = [r.name for r, _ in terms]
        if len(set(names)) != len(names):
            raise BenchError(f"reward {spec!r} names a term twice; accepted: each reward once")
        return WeightedSum(terms)
    m = _PLUGIN.match(spec)
    if m and "." in m.group(1) or (m and m.group(1) not in REGISTRY and m.group(2)[:1].isupper()):
        return _plugin(m.group(1), m.group(2))
    raise BenchError(f"unknown reward {spec!r}; {_accepted()}")
