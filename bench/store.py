"""The results store: one folder per run, every file written atomically.

A run folder holds::

    config.yaml          the resolved config (every default and override, variant names included)
    manifest.json        git commit, package versions, seed, device, start/end time, status
    metrics.parquet      one row per optimizer step (the source of truth) ...
    metrics.csv          ... and the same table for eyes
    reward_curve.png     train and eval reward against step, prompt fidelity beside it
    grids/step_NNNNNN.png  samples on the fixed eval prompts and seeds (start, intervals, end)
    checkpoint.pt        LoRA + optimizer + RNG state + metrics, for ``bench run --resume``
    lora/                the final LoRA adapter in peft's format (adapter_model.safetensors)

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

RESULTS_ROOT = "results"


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
