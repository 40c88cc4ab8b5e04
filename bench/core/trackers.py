"""Optional experiment trackers: TensorBoard (offline) and Weights & Biases, through accelerate's trackers.

The store (metrics.parquet) stays the source of truth; trackers only mirror each metrics row for people
who watch runs in those tools.  Neither package is a dependency of the suite: asking for a tracker whose
package is not installed is an error before the run starts, naming what to install.

    trackers = Trackers(["tensorboard"], run_dir, config=cfg)  # checks availability, writes nothing yet
    trackers.log(row, step)                                    # finite numbers only; starts lazily
    trackers.close()

TensorBoard writes to ``<run_dir>/tensorboard/``.  W&B runs offline into ``<run_dir>/wandb/`` unless the
user sets ``WANDB_MODE`` (e.g. ``online``); the project is ``WANDB_PROJECT`` or ``diffalign``.
"""
from __future__ import annotations

import importlib.util
import math
import os

from diffalign.errors import BenchError


def _installed(*modules: str) -> bool:
    return any(importlib.util.find_spec(m) is not None for m in modules)


def _tensorboard(run_dir: str):
    from accelerate.tracking import TensorBoardTracker  # lazy: optional package (tensorboard)

    return TensorBoardTracker(run_name="tensorboard", logging_dir=run_dir)


def _wandb(run_dir: str):
    from accelerate.tracking import WandBTracker  # lazy: optional package (wandb)

    return WandBTracker(run_name=os.path.basename(os.path.normpath(run_dir)),
                        project=os.environ.get("WANDB_PROJECT", "diffalign"), dir=run_dir,
                        mode=os.environ.get("WANDB_MODE", "offline"))


# name -> (modules, one of which must be importable; what to install; factory(run_dir) -> accelerate tracker)
BACKENDS = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install tensorboard", _tensorboard),
    "wandb": (("wandb",), "pip install wandb", _wandb),
}


def _flat(cfg: dict, prefix: str = "") -> dict:
    """A nested config as flat scalars (what TensorBoard's hparams accept)."""
    out = {}
    for k, v in dict(cfg).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        elif isinstance(v, (bool, int, float, str)) or v is None:
            out[key] = v if v is not None else "null"
        else:
            out[key] = str(v)
    return out


class Trackers:
    """The trackers a run asked for (``cfg.trackers``, a list of names); a no-op when the list is empty."""

    def __init__(self, names: list[str] | None, run_dir: str, config: dict | None = None):
        self.names = list(names or [])
        for n in self.names:
            if n not in BACKENDS:
                raise BenchError(f"unknown tracker {n!r}; accepted: {', '.join(BACKENDS)} (or none)")
            modules, install, _ = BACKENDS[n]
            if not _installed(*modules):
                raise BenchError(f"tracker {n!r} needs the {modules[0]!r} package, which is not installed; "
                                 f"accepted: '{install}', or leave {n!r} out of trackers")
        self.run_dir, self.config = run_dir, config
        self.active: list = []
        self.started = False

    def _start(self) -> None:
        self.started = True
        for n in self.names:
            tracker = BACKENDS[n][2](self.run_dir)
            tracker.start()
            if self.config is not None:
                tracker.store_init_configuration(_flat(self.config))
            self.active.append(tracker)

    def log(self, row: dict, step: int) -> None:
        if not self.names:
            return
        if not self.started:
            self._start()
        values = {k: float(v) for k, v in row.items()
                  if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        for t in self.active:
            t.log(values, step=step)

    def close(self) -> None:
        for t in self.active:
            t.finish()
        self.active = []
