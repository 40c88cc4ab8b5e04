"""The results store: atomic writes, and ``RunFolder``, the one owner of the run-folder format.

A run folder holds (``RunFolder`` names every file; nothing else spells these names)::

    config.yaml            the resolved config: every default and override, ``variant`` included
    manifest.json          git commit, package versions, seed, device, threads, start/end time, status, resumes
    metrics.parquet        one row per optimizer step (the source of truth) ...
    metrics.csv            ... and the same table for eyes
    eval_samples.parquet   one row per eval image and evaluation: step, prompt, seed, reward, held-out metrics
    eval_samples.csv       (the same)
    reward_curve.png       train and eval reward against step, prompt fidelity beside it
    grids/step_NNNNNN.png  samples on the fixed eval prompts and seeds (start, intervals, end)
    grids/start_vs_end.png the first and the last grid side by side
    checkpoint.pt          LoRA + method state + RNG state + cost counters + metrics, for ``bench run --resume``
    lora/                  the final adapter: pytorch_lora_weights.safetensors (keys ``unet.<peft key>``)
                           + adapter_config.json
    summary.json           eval reward and fidelity before -> after, the gain in standard errors, time, memory

Atomic means: a file is written to a temporary name in the same folder, flushed, fsynced and then
renamed over its target (``os.replace``), so a reader (or a killed run) sees the old file or the new
one, never half of one.  Folders are built under a temporary name and swapped in the same way.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import pandas as pd
import torch
import yaml

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_ROOT = "results"  # relative to the working directory: runs land where the user runs them


def project_path(path: str | None) -> str | None:
    """A relative path as given when it exists from here, else relative to the project root
    (so the committed tiny world is found from any working directory)."""
    if path is None or os.path.isabs(path) or os.path.exists(path):
        return path
    candidate = os.path.join(PROJECT_ROOT, path)
    return candidate if os.path.exists(candidate) else path


def safe_name(text: str) -> str:
    """A file or folder name from any text: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)


def _file_mode() -> int:
    """The mode a plainly created file gets (0o666 less the umask); mkstemp would give 0o600."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_with(path: str, writer: Callable[[io.BytesIO], object]) -> None:
    """Serialise with ``writer(buffer)`` in memory, then write atomically."""
    buf = io.BytesIO()
    writer(buf)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: object) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str) -> Iterator[str]:
    """Yield a temporary folder; on success it replaces ``path`` whole, on failure it is removed."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_table(df, stem: str) -> None:
    """Write a pandas table as ``stem.parquet`` (source of truth) and ``stem.csv``, both atomic."""
    atomic_write_with(stem + ".parquet", lambda b: df.to_parquet(b, index=False))
    atomic_write_text(stem + ".csv", df.to_csv(index=False))


def save_figure(fig, path: str, **kw) -> None:
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    atomic_write_with(path, lambda b: fig.savefig(b, format=fmt, **kw))


class RunFolder:
    """One run's folder: the paths of its files, and the readers and writers of each (all writes atomic)."""

    CONFIG = "config.yaml"
    MANIFEST = "manifest.json"
    METRICS = "metrics"            # .parquet + .csv
    EVAL_SAMPLES = "eval_samples"  # .parquet + .csv
    CURVE = "reward_curve.png"
    GRIDS = "grids"
    CHECKPOINT = "checkpoint.pt"
    LORA = "lora"
    SUMMARY = "summary.json"

    def __init__(self, path: str):
        self.path = path

    def __repr__(self) -> str:
        return f"RunFolder({self.path!r})"

    def file(self, *parts: str) -> str:
        return os.path.join(self.path, *parts)

    @property
    def config_path(self) -> str:
        return self.file(self.CONFIG)

    @property
    def manifest_path(self) -> str:
        return self.file(self.MANIFEST)

    @property
    def metrics_path(self) -> str:
        return self.file(self.METRICS + ".parquet")

    @property
    def checkpoint_path(self) -> str:
        return self.file(self.CHECKPOINT)

    @property
    def lora_path(self) -> str:
        return self.file(self.LORA)

    @property
    def curve_path(self) -> str:
        return self.file(self.CURVE)

    def grid_path(self, step: int) -> str:
        return self.file(self.GRIDS, f"step_{step:06d}.png")

    @property
    def start_vs_end_path(self) -> str:
        return self.file(self.GRIDS, "start_vs_end.png")

    def grid_steps(self) -> list[int]:
        """The steps that have a saved sample grid, ascending."""
        gdir = self.file(self.GRIDS)
        if not os.path.isdir(gdir):
            return []
        return sorted(int(f[5:11]) for f in os.listdir(gdir) if f.startswith("step_") and f.endswith(".png"))

    # ---- what is there -------------------------------------------------------------------------------
    def is_run(self) -> bool:
        """A folder with a config and a metrics table: what the comparison tools can read."""
        return os.path.isfile(self.config_path) and os.path.isfile(self.metrics_path)

    def holds_run(self) -> bool:
        """A run was started here (its manifest exists)."""
        return os.path.isfile(self.manifest_path)

    def status(self) -> str:
        """'new' (no run here yet), 'complete' or 'interrupted'."""
        if not self.holds_run():
            return "new"
        return "complete" if self.read_manifest().get("status") == "complete" else "interrupted"

    # ---- readers and writers -------------------------------------------------------------------------
    def read_config(self) -> dict:
        with open(self.config_path) as f:
            return yaml.safe_load(f)

    def write_config(self, cfg: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None))

    def read_manifest(self) -> dict:
        if not os.path.isfile(self.manifest_path):
            return {}
        with open(self.manifest_path) as f:
            return json.load(f)

    def update_manifest(self, **fields) -> None:
        atomic_write_json(self.manifest_path, {**self.read_manifest(), **fields})

    def read_metrics(self) -> pd.DataFrame:
        return pd.read_parquet(self.metrics_path)

    def write_metrics(self, df: pd.DataFrame) -> None:
        write_table(df, self.file(self.METRICS))

    def write_eval_samples(self, df: pd.DataFrame) -> None:
        write_table(df, self.file(self.EVAL_SAMPLES))

    def read_summary(self) -> dict | None:
        path = self.file(self.SUMMARY)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.file(self.SUMMARY), summary)

    def read_checkpoint(self) -> dict:
        return torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)

    def write_checkpoint(self, state: dict) -> None:
        atomic_write_with(self.checkpoint_path, lambda b: torch.save(state, b))
