"""The step-0 evaluation, computed once and reused by every run that would compute the same numbers.

At step 0 every run evaluates the base model: its LoRA adapter starts as a no-op (B = 0) and full fine-tuning
starts from the base weights, so the evaluation depends only on what the key below holds, never on the method,
its settings or the run's seed.  The cache keeps that evaluation (metrics, per-image scores, the images as the
grids store them, 8-bit) under ``<user cache>/eval0/<key>.pt`` and a run with the same key loads it instead of
sampling again: the numbers are the ones a fresh evaluation gives, bit for bit (tests/bench/test_evalcache.py).
The user cache is ``diffalign.store.user_cache_dir()``: ``$DIFFALIGN_CACHE``, else ``$XDG_CACHE_HOME/diffalign``,
else ``~/.cache/diffalign``; one folder for every run of the user, wherever it runs and wherever its run folder
goes (``--out``), checkout or installed package, so the cache is hit across runs and no run writes into the
checkout (or site-packages) for it.

The key is a SHA-256 over

- the model folder and every folder of ``models/`` (the judge, the tiny rewards): file names, sizes and contents
  (files over 64 MiB by their first and last 16 MiB and their size);
- the eval settings: ``eval`` (every key but the schedule, ``every`` and ``grid_every``: when a run evaluates
  changes nothing of its step-0 evaluation), ``eval_prompts`` and the prompt texts, ``reward``, ``judge``, the
  training sampler's steps and guidance (the KL-to-base trajectories), ``finetune``, ``mixed_precision``;
- where it runs: the device, torch's thread count (the summation order), the torch version, and the
  ``DIFFALIGN_*`` environment variables that name a file or folder (the reward weights they point at);
- the code of the evaluation: the source of every module it runs (``CODE``), and of any plug-in reward.

Change any of them and the key changes, so a stale evaluation is never reused.  ``DIFFALIGN_EVAL_CACHE=0`` turns
the cache off; ``DIFFALIGN_EVAL_CACHE=<folder>`` puts the step-0 evaluations in that folder itself.  A cache that
cannot be written (a read-only home) costs one warning line, never the run.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys

import torch

from diffalign import store
from diffalign.store import CODE_ROOT, PROJECT_ROOT, atomic_write_with

CACHE_ENV = "DIFFALIGN_EVAL_CACHE"
BIG = 64 * 2 ** 20
CHUNK = 16 * 2 ** 20
# every module the evaluation runs: sampler, DDIM, pipeline, judge, world, rewards, prompts, FD
CODE = ["bench/core/evaluate.py", "bench/core/fd.py", "bench/tinyworld/judge.py", "diffalign/sampling.py",
        "diffalign/ddim.py", "diffalign/process.py", "diffalign/flow.py", "diffalign/flow_models.py",
        "diffalign/pipeline.py", "diffalign/world.py", "diffalign/frechet.py",
        "diffalign/images.py", "diffalign/realdata.py", "diffalign/lora.py", "prompts/__init__.py"]
CODE_DIRS = ["rewards", "prompts"]
SCHEDULE = ("every", "grid_every", "at")  # when a run evaluates: not part of what its step-0 evaluation computes


def enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1") not in ("0", "false", "no")


def _hash_file(h, path: str) -> None:
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)}:{size}".encode())
    with open(path, "rb") as f:
        if size <= BIG:
            h.update(f.read())
        else:
            h.update(f.read(CHUNK))
            f.seek(size - CHUNK)
            h.update(f.read(CHUNK))


def _hash_tree(h, root: str) -> None:
    if os.path.isfile(root):
        _hash_file(h, root)
        return
    for d, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for f in sorted(files):
            if not f.startswith((".tmp-", ".old-")) and not f.endswith(".state.pt"):
                h.update(os.path.relpath(os.path.join(d, f), root).encode())
                _hash_file(h, os.path.join(d, f))


def code_hash() -> str:
    h = hashlib.sha256()
    files = [os.path.join(CODE_ROOT, p) for p in CODE]
    for d in CODE_DIRS:
        base = os.path.join(CODE_ROOT, d)
        files += [os.path.join(base, f) for f in sorted(os.listdir(base)) if f.endswith((".py", ".txt"))]
    for path in sorted(set(files)):
        h.update(os.path.relpath(path, CODE_ROOT).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def _plugin_sources(specs: list[str]) -> dict[str, str]:
    """The source hash of every plug-in reward (``package.module:Class``) among the specs: its code is the eval's."""
    out = {}
    for spec in specs:
        for part in str(spec).split(","):
            m = re.match(r"^\s*([A-Za-z_][\w.]*)\s*:\s*([A-Za-z_]\w*)\s*$", part)
            if not m:
                continue
            try:
                origin = importlib.util.find_spec(m.group(1)).origin
            except (ImportError, AttributeError, ValueError):
                origin = None
            if origin and os.path.isfile(origin):
                with open(origin, "rb") as f:
                    out[part.strip()] = hashlib.sha256(f.read()).hexdigest()
    return out


def key(cfg, model_path: str, device: str) -> str:
    h = hashlib.sha256()
    _hash_tree(h, model_path)
    models = os.path.join(PROJECT_ROOT, "models")
    if os.path.isdir(models):
        _hash_tree(h, models)
    settings = {"eval": {k: v for k, v in dict(cfg["eval"]).items() if k not in SCHEDULE},
                "eval_prompts": cfg["eval_prompts"], "reward": cfg["reward"],
                "judge": cfg["judge"], "sampler": {k: cfg["sampler"][k] for k in ("num_steps", "guidance")},
                "finetune": cfg.get("finetune", "lora"), "mixed_precision": cfg["mixed_precision"],
                "device": device, "threads": torch.get_num_threads(), "torch": torch.__version__,
                "env": {k: v for k, v in sorted(os.environ.items())  # the variables that point at weights
                        if k.startswith("DIFFALIGN_") and k not in (CACHE_ENV, store.CACHE_ENV)
                        and os.path.exists(v)},
                "code": code_hash(), "plugins": _plugin_sources([cfg["reward"], *cfg["eval"]["metrics"]])}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:24]


def path_of(k: str) -> str:
    where = os.environ.get(CACHE_ENV, "1")
    root = where if where not in ("1", "true", "yes", "") else os.path.join(store.user_cache_dir(), "eval0")
    return os.path.join(root, f"{k}.pt")


def load(k: str) -> dict | None:
    """The cached step-0 evaluation (metrics, samples, images as uint8, prompts), or None."""
    path = path_of(k)
    if not enabled() or not os.path.isfile(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # a damaged cache file is recomputed, never trusted
        return None


def save(k: str, entry: dict) -> None:
    if not enabled():
        return
    try:
        atomic_write_with(path_of(k), lambda b: torch.save(entry, b))
    except OSError as e:  # a cache is a saving, never a reason to fail a run
        print(f"warning: the step-0 evaluation was not cached ({path_of(k)}: {e.strerror or e}); set "
              f"{store.CACHE_ENV} to a writable folder, or {CACHE_ENV}=0 to turn the cache off", file=sys.stderr)
