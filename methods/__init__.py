"""The method registry: one line per method (its name -> its module).  Each method is one module that reads like its
paper's algorithm box and declares everything about itself; what it must declare is the contract in
``diffalign/contract.py`` (``MethodModule``: CONFIG_SECTION, DEFAULTS with their RULES, NEEDS_DIFFERENTIABLE_REWARD,
SMOKE, variant, validate (cross-key checks only), data_parallel, companion_baseline, Method), checked for every entry
below by tests/methods/test_contract.py.

Adding a method: its file here, its preset ``bench/presets/<name>.yaml``, its tests, and one line below.  Methods
never import each other, nor ``bench``; shared machinery lives in ``diffalign``.
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
    "rwr": "methods.rwr",            # RWR: reward-weighted regression (a denoising loss on reward-weighted samples)
    "flow-grpo": "methods.grpo",       # GRPO: the SDE on every step, KL to the base, fewer training than eval steps
    "flow-grpo-fast": "methods.grpo",  # GRPO: the SDE and training on a window of 1-2 steps, the ODE elsewhere
    "dance-grpo": "methods.grpo",      # GRPO: one initial noise per group, a random subset of steps trained, no KL
    "mix-grpo": "methods.grpo",        # GRPO: the SDE and training on a window that slides along training
    "diffusion-nft": "methods.diffusion_nft",  # DiffusionNFT: implicit positive/negative flow matching on clean samples
}


def method_module(name: str):
    """The module that implements method ``name`` (imported on first use)."""
    if name not in METHODS:
        raise BenchError(f"unknown method {name!r}; accepted: {', '.join(sorted(METHODS))}")
    return importlib.import_module(METHODS[name])
