"""The method registry.  Each method is one module that reads like its paper's algorithm box.

A method module defines

    NAME_KEY        its section in the run config (``cfg.<NAME_KEY>``)
    DEFAULTS        that section's defaults, scaled to the tiny world
    NEEDS_DIFFERENTIABLE_REWARD
    variant(cfg)    the exact implementation variant, recorded in every run's config and manifest
    Method(ctx)     with ``step() -> dict`` (one optimizer update, returns its metrics),
                    ``state_dict()`` and ``load_state_dict()`` (optimizer and any other state)

Methods never import each other; shared machinery lives in ``bench/``.
"""
from __future__ import annotations

import importlib

from bench.errors import BenchError

METHODS = {
    "alignprop": "methods.alignprop",
    "ddpo": "methods.ddpo",        # DDPO-IS
    "ddpo-sf": "methods.ddpo",     # DDPO-SF (preset sets ddpo.estimator=sf)
    "dpok": "methods.dpok",
    "rlr": "methods.rlr",          # RLR, the paper estimator (FO + HO + ZO)
    "rlr-code": "methods.rlr",     # RLR as the released code does it (FO K = 1 + PPO single steps)
}


def get_method(name: str):
    if name not in METHODS:
        raise BenchError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
