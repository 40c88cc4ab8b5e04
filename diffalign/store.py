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
    checkpoint.prev.pt     the checkpoint before it, kept until the new one is whole on disk (the fallback)
    lora/                  the final adapter: pytorch_lora_weights.safetensors (keys ``unet.<peft key>``)
                           + adapter_config.json (full fine-tuning: the UNet as diffusers saves it)
    summary.json           eval reward and fidelity before -> after, the gain in standard errors, time, memory
    fd_nfe.csv/.md/.png    the Frechet distance against NFE (runs that have ``fd`` in ``eval.metrics``)
    baseline/              a companion run's folder (OGDM's gamma = 0 baseline), of the same form
    .lock                  the writing process's lock (``fcntl``) and its pid: one writer per folder (removed when
                           the writer ends; a killed writer's is left and taken over by the next)

Atomic means: a file is written to a temporary name in the same folder, flushed, fsynced and then
renamed over its target (``os.replace``), so a reader (or a killed run) sees the old file or the new
one, never half of one.  Folders are built under a temporary name and swapped in the same way.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import tempfile
from typing import Callable, Iterator

import pandas as pd
import torch
import yaml

from diffalign.errors import BenchError


class FolderBusy(BenchError):
    """Another process holds the run folder's writer lock."""

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
# The folder that holds the packages (diffalign/, bench/, methods/, rewards/, prompts/): the checkout, or for an
# installed wheel its site-packages.  Code is found here (the evaluation cache hashes it).
CODE_ROOT = os.path.dirname(_PACKAGE)
# The folder that holds models/ (the tiny world's committed weights): the checkout; an installed wheel carries them as
# package data, diffalign/models/ (pyproject.toml maps models/ there), so for an installed package it is diffalign/.
PROJECT_ROOT = _PACKAGE if os.path.isdir(os.path.join(_PACKAGE, "models")) else CODE_ROOT
IN_CHECKOUT = PROJECT_ROOT == CODE_ROOT
RESULTS_ROOT = "results"  # relative to the working directory: runs land where the user runs them, checkout or not
CACHE_ENV = "DIFFALIGN_CACHE"


def user_cache_dir() -> str:
    """Where DiffAlign keeps what it can compute again (the step-0 evaluations): ``$DIFFALIGN_CACHE``, else
    ``$XDG_CACHE_HOME/diffalign``, else ``~/.cache/diffalign`` (the XDG base directory rule), checkout or not."""
    if os.environ.get(CACHE_ENV):
        return os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV]))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "diffalign")


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


def _write_temp(path: str, data: bytes) -> str:
    """``data`` written and fsynced under a temporary name beside ``path``; returns that name."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=directory)
    try:
        os.fchmod(fd, _file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(directory: str) -> None:
    """Make the renames in ``directory`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = _write_temp(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _first_line(e: BaseException) -> str:
    if isinstance(e, yaml.YAMLError):
        return yaml_problem(e)
    text = str(e).strip()
    return (text.splitlines()[0][:160] if text else type(e).__name__)


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML syntax error in one line, with where it is: 'line 3, column 7: mapping values are not allowed here
    (while scanning a simple key)' (yaml's problem mark; its lines and columns counted from 1, as editors do)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    problem = getattr(e, "problem", None) or (str(e).strip().splitlines() or [type(e).__name__])[0]
    context = getattr(e, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}" + (f" ({context})" if context else "")


def load_yaml(path: str, what: str, accepted: str):
    """A YAML file the user hands in (a preset, a sweep or protocol file); a syntax error is one error line naming
    ``what`` and the file, the line and column of the problem, and what is ``accepted``."""
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise BenchError(f"{what} {path!r} is not valid YAML: {yaml_problem(e)}; accepted: {accepted}") from None
    except UnicodeDecodeError as e:
        raise BenchError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start}); accepted: "
                         f"{accepted}") from None


def damaged(path: str, e: BaseException, accepted: str) -> BenchError:
    """The one-line error of a file that cannot be read."""
    return BenchError(f"{path!r} is damaged ({type(e).__name__}: {_first_line(e)}); accepted: {accepted}")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (ValueError, UnicodeDecodeError) as e:
        raise damaged(path, e, "a JSON object written by 'bench run'") from None


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


def _same_file(fd: int, path: str) -> bool:
    """``path`` still names the file open as ``fd`` (not unlinked, not replaced)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


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
    LOCK = ".lock"                 # the writing process's OS lock (fcntl) and its pid
    PREVIOUS_CHECKPOINT = "checkpoint.prev.pt"  # the one before, kept until the new one is whole on disk
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

    @contextlib.contextmanager
    def lock(self, warn=None) -> Iterator[None]:
        """Hold the folder's writer lock (``fcntl.flock`` on ``.lock``, which also holds the holder's pid) for the
        duration; the file is removed when the lock is released, so a finished run leaves no ``.lock`` behind.
        A second writer gets one error line naming the holder's pid.  The OS releases the lock when its holder dies,
        so a lock file left by a killed process is stale: it is taken over, with one warning line through ``warn``.

        Why removing the file at release is safe: the lock is on the file's inode, not on its name.  The holder
        unlinks the name *while it still holds the lock*, and only then unlocks.  A process that opened the old
        inode before the unlink may get the lock after the unlock, but then finds that the name no longer leads
        to the inode it locked (``_same_file``) and starts over on the name, where the next writer will create a
        new file.  So every writer that goes on holds the lock of the inode the name leads to, and two writers
        never both hold that one: one writer per folder, with or without the file's removal."""
        os.makedirs(self.path, exist_ok=True)
        path = self.file(self.LOCK)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise FolderBusy(f"run folder {self.path!r} is being written by process {holder} (it holds "
                                 f"{self.LOCK}); accepted: one writer per run folder: wait for it to end, then "
                                 "resume") from None
            if _same_file(fd, path):
                break
            os.close(fd)  # locked an inode a releasing writer had just unlinked: try the name again
        try:
            previous = os.pread(fd, 64, 0).decode(errors="replace").strip()
            if previous and previous != str(os.getpid()) and warn is not None:
                warn(f"warning: run folder {self.path!r}: took over the lock left by process {previous}, which no "
                     "longer holds it")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
            os.fsync(fd)
            try:
                yield
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # still locked: see the docstring for why this cannot let a second writer in
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def locked_by(self) -> str | None:
        """The pid of the process that holds the writer lock now, or None (a probe: nothing is taken)."""
        path = self.file(self.LOCK)
        if not os.path.isfile(path):
            return None
        fd = os.open(path, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

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
        try:
            with open(self.config_path) as f:
                cfg = yaml.safe_load(f)
            if not isinstance(cfg, dict):
                raise ValueError("not a mapping")
            return cfg
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as e:
            raise damaged(self.config_path, e, "a config.yaml written by 'bench run'") from None

    def write_config(self, cfg: dict) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=None))

    def read_manifest(self) -> dict:
        if not os.path.isfile(self.manifest_path):
            return {}
        return _read_json(self.manifest_path)

    def update_manifest(self, **fields) -> None:
        atomic_write_json(self.manifest_path, {**self.read_manifest(), **fields})

    def read_metrics(self) -> pd.DataFrame:
        try:
            df = pd.read_parquet(self.metrics_path)
        except Exception as e:  # pyarrow's errors of a truncated or foreign file
            raise damaged(self.metrics_path, e, "a metrics table written by 'bench run'") from None
        if "step" not in df:
            raise damaged(self.metrics_path, ValueError("no step column"), "a metrics table written by 'bench run'")
        return df

    def write_metrics(self, df: pd.DataFrame) -> None:
        write_table(df, self.file(self.METRICS))

    def write_eval_samples(self, df: pd.DataFrame) -> None:
        write_table(df, self.file(self.EVAL_SAMPLES))

    def read_summary(self) -> dict | None:
        path = self.file(self.SUMMARY)
        if not os.path.isfile(path):
            return None
        return _read_json(path)

    def write_summary(self, summary: dict) -> None:
        atomic_write_json(self.file(self.SUMMARY), summary)

    @property
    def previous_checkpoint_path(self) -> str:
        return self.file(self.PREVIOUS_CHECKPOINT)

    def has_checkpoint(self) -> bool:
        return os.path.isfile(self.checkpoint_path) or os.path.isfile(self.previous_checkpoint_path)

    def read_checkpoint(self, required: tuple[str, ...] = (), warn=None) -> dict:
        """The last checkpoint; if it is damaged (truncated, foreign, missing ``required`` keys), the previous one,
        with one warning line through ``warn``; if neither is usable, one error line naming the files."""
        problems = []
        for path in (self.checkpoint_path, self.previous_checkpoint_path):
            if not os.path.isfile(path):
                problems.append(f"{os.path.basename(path)}: missing")
                continue
            try:
                state = torch.load(path, map_location="cpu", weights_only=False)
                missing = [k for k in required if not isinstance(state, dict) or k not in state]
                if missing:
                    raise ValueError(f"lacks {', '.join(missing)}")
            except Exception as e:  # torch's zip reader, pickle, our own check
                problems.append(f"{os.path.basename(path)}: {_first_line(e)}")
                continue
            if problems and warn is not None:
                warn(f"warning: {self.checkpoint_path!r} is damaged ({problems[0]}); resuming from "
                     f"{os.path.basename(path)} (step {state.get('step')})")
            return state
        raise BenchError(f"run folder {self.path!r} has no usable checkpoint ({'; '.join(problems)}); accepted: "
                         "a run folder whose checkpoint.pt or checkpoint.prev.pt is intact")

    def write_checkpoint(self, state: dict) -> None:
        """Rotate: the new checkpoint is written and fsynced under a temporary name, then the current one becomes
        checkpoint.prev.pt and the new one checkpoint.pt; a crash anywhere leaves at least one whole checkpoint."""
        buf = io.BytesIO()
        torch.save(state, buf)
        tmp = _write_temp(self.checkpoint_path, buf.getvalue())
        try:
            if os.path.isfile(self.checkpoint_path):
                os.replace(self.checkpoint_path, self.previous_checkpoint_path)
            os.replace(tmp, self.checkpoint_path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.path)


class FollowerFolder(RunFolder):
    """A run folder as the non-main processes of a data-parallel run see it: every read as usual, every write (and
    the writer lock) left to the main process, which alone writes the store."""

    @contextlib.contextmanager
    def lock(self, warn=None) -> Iterator[None]:
        yield

    def write_config(self, cfg: dict) -> None:
        pass

    def update_manifest(self, **fields) -> None:
        pass

    def write_metrics(self, df: pd.DataFrame) -> None:
        pass

    def write_eval_samples(self, df: pd.DataFrame) -> None:
        pass

    def write_summary(self, summary: dict) -> None:
        pass

    def write_checkpoint(self, state: dict) -> None:
        pass

