"""The method registry.  Each method is one module that reads like its paper's algorithm box.

A method module defines

    CONFIG_SECTION  its section in the run config (``cfg.<CONFIG_SECTION>``)
    DEFAULTS        that section's defaults, scaled to the tiny world
    NEEDS_DIFFERENTIABLE_REWARD
    validate(cfg)   one ``BenchError`` line for a setting the method cannot run (optional)
    variant(cfg)    the exact implementation variant, recorded in every run's config and manifest
    Method(ctx)     with ``step() -> dict`` (one optimizer update, returns its metrics),
                    ``state_dict()`` and ``load_state_dict()`` (optimizer and any other state)

``ctx`` is ``bench.core.context.Context``: the pipeline with its LoRA, the reward, the prompts, the RNG and the cost
counters.  Methods never import each other, nor ``bench``; shared machinery lives in ``diffalign``.
"""
from __future__ import annotations

import importlib

from diffalign.errors import BenchError

METHODS = {
    "alignprop": "methods.alignprop",
    "ddpo": "methods.ddpo",          # DDPO-IS
    "ddpo-sf": "methods.ddpo",       # DDPO-SF (preset sets ddpo.estimator=sf)
    "dpok": "methods.dpok",
    "rlr": "methods.rlr",            # RLR, the paper estimator (FO + HO + ZO)
    "rlr-code": "methods.rlr_code",  # RLR as the released code does it (FO K = 1 + PPO single steps)
    "diffusion-dpo": "methods.diffusion_dpo",  # DPO on terminal preference pairs, uniform credit over timesteps
    "dde": "methods.dde",            # DDE, our reconstruction (dde/reconstructed): DPO with a derived credit weight
    "ogdm": "methods.ogdm",          # OGDM: denoising loss + a noise-level-conditioned discriminator on real data
}


def method_module(name: str):
    """The module that implements method ``name`` (imported on first use)."""
    if name not in METHODS:
        raise BenchError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
