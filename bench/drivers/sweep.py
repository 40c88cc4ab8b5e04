"""Sweeps: a grid of method x reward x variant x seed, run into the store, resumable.

    python -m bench sweep --methods alignprop ddpo --seeds 0 1 2 --reward saturation [--set k=v ...] [--root DIR]
    python -m bench sweep --file sweep.yaml        # keys: methods, seeds, rewards (or reward), set, variants, root
    python -m bench sweep ... --executor ray [--address HOST:PORT] [--cpus-per-run N]   # each run a Ray task

``variants`` (sweep files only) is a list of arms, each a list of ``KEY=VALUE`` overrides applied on top of ``set``:
one method under several settings, e.g. the DDE credit study's four weightings.

A run's identity is a hash of its resolved config (``bench.core.config.resolve(method, overrides)``): the
same resolved config is the same run, and its folder is ``<root>/<method>-<reward>-seed<S>-<hash>``.
So running a sweep again

- skips every run whose manifest says ``complete``,
- resumes (``bench.core.run.resume``) every run that was interrupted (manifest ``running``), from its
  last checkpoint, and
- starts the runs that have no folder yet,

which makes an interrupted sweep continue where it stopped.  Each run is taken under its folder's writer lock
(``RunFolder.lock``): a run that another process is writing is skipped ("being run by process N"), so two sweep
drivers on one folder share the work and no run is run twice.  A ``--set`` override whose first key is
another method's section (``alignprop.lr=...`` in a sweep that also runs ``ddpo``) applies to that
method only.  ``<root>/sweep.json`` lists the sweep's runs and their status (what ``bench compare``,
``table`` and ``report`` read when given the sweep folder).

Executors: ``local`` (the default) runs the runs one after another in this process; ``ray`` makes each run a Ray
task (a local instance, or the cluster at ``--address``; one GPU per run where there are GPUs, ``--cpus-per-run``
CPUs each) running the same per-run code (``run_one``) over the same folder, so the run folders, their hashes and
their metrics are the same, and an interrupted Ray sweep resumes exactly like a local one.  ``ray`` is an optional
extra (``pip install -e .[ray]``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

from bench.core import run
from bench.core.config import identity, resolve
from diffalign import store
from diffalign.errors import BenchError
from diffalign.store import FolderBusy, RunFolder, load_yaml, safe_name
from methods import METHODS, method_module

SWEEP_CRASH_RUN_ENV = "DIFFALIGN_SWEEP_CRASH_RUN"  # tests: the harness's crash env applies to this run only (1-based)
DEFAULT_ROOT = os.path.join(store.RESULTS_ROOT, "sweeps", "default")


@dataclasses.dataclass
class PlannedRun:
    method: str
    reward: str
    seed: int
    cfg: dict
    run_id: str
    run_dir: str


def config_hash(cfg: dict) -> str:
    """The run's identity: a hash of its resolved config (the harness's own additions and the trackers,
    which mirror the metrics without changing them, left out)."""
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def _method_sections() -> dict[str, str]:
    return {m: method_module(m).CONFIG_SECTION for m in METHODS}


def overrides_for(method: str, overrides: list[str]) -> list[str]:
    """The overrides that apply to ``method``: all but those addressed to another method's section."""
    sections = _method_sections()
    own = sections[method]
    others = set(sections.values()) - {own}
    return [o for o in overrides if o.split("=", 1)[0].strip().split(".")[0] not in others]


def plan(methods: list[str], seeds: list[int], rewards: list[str], overrides: list[str], root: str,
         variants: list[list[str]] | None = None) -> list[PlannedRun]:
    """Resolve every run of the grid reward x method x variant x seed (bad input fails here, before anything runs).
    ``variants``: arms of extra overrides (each applied on top of ``overrides``); none = one arm."""
    if not methods:
        raise BenchError("a sweep needs --methods (one or more); see 'python -m bench list'")
    for m in methods:
        method_module(m)  # unknown method -> one clear line
    runs = []
    for reward in rewards or [None]:
        for method in methods:
            for arm in variants or [[]]:
                runs += _plan_seeds(method, reward, seeds, overrides + [str(o) for o in arm], root)
    return runs


def _plan_seeds(method: str, reward: str | None, seeds: list[int], overrides: list[str], root: str) -> list[PlannedRun]:
    runs = []
    for seed in seeds or [0]:
        extra = [f"seed={seed}"] + ([f"reward={reward}"] if reward else [])
        cfg = resolve(method, overrides_for(method, overrides) + extra)
        run_id = config_hash(cfg)
        name = safe_name(f"{method}-{cfg['reward']}-seed{seed}-{run_id}")
        runs.append(PlannedRun(method, cfg["reward"], seed, cfg, run_id, os.path.join(root, name)))
    return runs


def status_of(run_dir: str) -> str:
    """'new' (no run there yet), 'complete' or 'interrupted'."""
    return RunFolder(run_dir).status()


def _check_identity(planned: PlannedRun) -> None:
    folder = RunFolder(planned.run_dir)
    if os.path.isfile(folder.config_path):
        held = config_hash(folder.read_config())
        if held != planned.run_id:
            raise BenchError(f"run folder {planned.run_dir!r} holds another config (hash {held}, expected "
                             f"{planned.run_id}); accepted: a folder written by this sweep, or remove it")


def write_index(root: str, runs: list[PlannedRun], outcome: dict[str, str]) -> None:
    """``<root>/sweep.json``: every run the sweeps into this root planned, merged with earlier sweeps."""
    path = os.path.join(root, "sweep.json")
    index = {}
    if os.path.isfile(path):
        with open(path) as f:
            index = {r["run_id"]: r for r in json.load(f).get("runs", [])}
    for r in runs:
        index[r.run_id] = {"run_id": r.run_id, "method": r.method, "reward": r.reward, "seed": r.seed,
                           "dir": os.path.basename(r.run_dir), "status": outcome.get(r.run_id, status_of(r.run_dir))}
    store.atomic_write_json(path, {"runs": sorted(index.values(), key=lambda r: (r["reward"], r["method"], r["seed"]))})


EXECUTORS = ("local", "ray")


def run_one(r: PlannedRun, i: int, n: int, log=print) -> str | None:
    """Run, skip or resume one planned run under its folder's writer lock; returns its outcome ('complete',
    'refused: ...'), or None when another process holds it."""
    what = f"[{i}/{n}] {r.method} {r.reward} seed {r.seed} ({os.path.basename(r.run_dir)})"
    folder = RunFolder(r.run_dir)
    try:
        with folder.lock(run.warn):  # this driver's run now; another driver skips it
            state = status_of(r.run_dir)
            if state == "complete":
                log(f"{what}: complete, skipped")
                return "complete"
            if state == "interrupted":
                log(f"{what}: interrupted, resuming")
                run.resume(r.run_dir, locked=True)
            else:
                log(f"{what}: running")
                run.start(r.cfg, r.run_dir, locked=True)
            return "complete"
    except FolderBusy as e:
        log(f"{what}: being run by another process, skipped ({e})")
        return None
    except BenchError as e:  # e.g. a method that needs a differentiable reward: this run only
        log(f"{what}: refused: {e}")
        return f"refused: {e}"


def _crash_switch(i: int, crash_step: str | None, crash_run: str | None) -> None:
    """Tests: the harness's crash switch applies to the chosen run only (1-based)."""
    if crash_run is not None:
        if i == int(crash_run) and crash_step:
            os.environ[run.CRASH_ENV] = crash_step
        else:
            os.environ.pop(run.CRASH_ENV, None)


def run_sweep(runs: list[PlannedRun], root: str, log=print, executor: str = "local", address: str | None = None,
              cpus_per_run: float = 2) -> dict[str, str]:
    """Run (or skip, or resume) every planned run; returns run_id -> outcome.  ``local``: one after another in this
    process; ``ray``: each run a Ray task (``_run_on_ray``)."""
    for r in runs:
        _check_identity(r)
    os.makedirs(root, exist_ok=True)
    outcome: dict[str, str] = {}
    write_index(root, runs, outcome)
    crash_step, crash_run = os.environ.get(run.CRASH_ENV), os.environ.get(SWEEP_CRASH_RUN_ENV)
    if executor == "ray":
        return _run_on_ray(runs, root, outcome, log, address, cpus_per_run, crash_step, crash_run)
    for i, r in enumerate(runs, 1):
        _crash_switch(i, crash_step, crash_run)
        result = run_one(r, i, len(runs), log)
        if result is not None:
            outcome[r.run_id] = result
        write_index(root, runs, outcome)
    return outcome


def _ray_task(r: PlannedRun, i: int, n: int, crash_step: str | None, crash_run: str | None) -> str | None:
    """One run in a Ray worker: the same ``run_one`` as the local executor, from the project's root.

    A worker whose raylet is gone (a local instance ends with its killed driver) would otherwise go on computing
    until it next speaks to Ray, holding its run folder; a watchdog ends it at once instead (exit 137, as a kill:
    every write is atomic, the run stays interrupted and the next sweep resumes it)."""
    import threading

    parent = os.getppid()

    def watchdog():
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(137)

    threading.Thread(target=watchdog, daemon=True).start()
    os.chdir(store.PROJECT_ROOT)
    _crash_switch(i, crash_step, crash_run)
    return run_one(r, i, n, lambda line: print(line, flush=True))


def _run_on_ray(runs: list[PlannedRun], root: str, outcome: dict[str, str], log, address: str | None,
                cpus_per_run: float, crash_step: str | None, crash_run: str | None) -> dict[str, str]:
    """Every run a Ray task on the instance at ``address`` (None: a local instance started here, ended with this
    process), one GPU each where the cluster has GPUs, over the shared ``root``.  Workers need this checkout at the
    same path (a shared file system); the driver writes ``sweep.json`` as tasks end.  A task whose worker dies
    leaves its run interrupted (the next sweep resumes it), and the others go on."""
    try:
        import ray
    except ImportError:
        raise BenchError("executor 'ray' needs the ray package (pip install -e .[ray]); accepted without it: "
                         "--executor local") from None
    env = {k: v for k, v in os.environ.items() if k.startswith("DIFFALIGN_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (store.PROJECT_ROOT, os.environ.get("PYTHONPATH")) if p)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, runtime_env={"env_vars": env})
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise BenchError(f"cannot reach a Ray instance at {address!r} ({str(e).splitlines()[0][:200]}); accepted: "
                         "--address host:port of a running Ray head ('ray start --head'), or none for a local "
                         "instance") from None
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        task = ray.remote(num_cpus=cpus_per_run, num_gpus=gpus, max_retries=0)(_ray_task)
        pending = {task.remote(r, i, len(runs), crash_step, crash_run): r for i, r in enumerate(runs, 1)}
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            r = pending.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayError as e:
                log(f"{r.method} {r.reward} seed {r.seed} ({os.path.basename(r.run_dir)}): its Ray task failed "
                    f"({type(e).__name__}); the run is left {status_of(r.run_dir)}, a rerun of the sweep resumes it")
                result = None
            if result is not None:
                outcome[r.run_id] = result
            write_index(root, runs, outcome)
    finally:
        ray.shutdown()
    return outcome


def load_file(path: str) -> dict:
    """A sweep YAML: ``methods``, ``seeds``, ``rewards`` (or ``reward``), ``set`` (list of KEY=VALUE), ``root``."""
    if not os.path.isfile(path):
        raise BenchError(f"sweep file {path!r} does not exist; accepted: a YAML file with methods, seeds, rewards, set")
    data = load_yaml(path, "sweep file", "a YAML file with methods, seeds, rewards, set") or {}
    accepted = {"methods", "seeds", "rewards", "reward", "set", "root", "variants"}
    if not isinstance(data, dict) or set(data) - accepted:
        bad = sorted(set(data) - accepted) if isinstance(data, dict) else data
        raise BenchError(f"sweep file {path!r}: unknown keys {bad}; accepted: {', '.join(sorted(accepted))}")
    if "reward" in data:
        data["rewards"] = [data.pop("reward")]
    for key in ("methods", "seeds", "rewards", "set"):
        if key in data and not isinstance(data[key], list):
            data[key] = [data[key]]
    variants = data.get("variants", [])
    if not isinstance(variants, list) or not all(isinstance(v, list) for v in variants):
        raise BenchError(f"sweep file {path!r}: variants must be a list of lists of KEY=VALUE overrides, "
                         f"got {variants!r}")
    return data


def main(args) -> int:
    """``bench sweep``: the command line's values win over the sweep file's."""
    spec = load_file(args.file) if args.file else {}
    methods = args.methods or spec.get("methods") or []
    seeds = args.seeds if args.seeds is not None else spec.get("seeds", [0])
    rewards = args.rewards or spec.get("rewards") or []
    overrides = [str(o) for o in spec.get("set", [])] + list(args.overrides)
    root = args.root or spec.get("root") or DEFAULT_ROOT
    try:
        seeds = [int(s) for s in seeds]
    except (TypeError, ValueError):
        raise BenchError(f"seeds {seeds!r}; accepted: integers") from None
    runs = plan(methods, seeds, rewards, overrides, root, spec.get("variants"))
    if args.executor not in EXECUTORS:
        raise BenchError(f"executor {args.executor!r}; accepted: {', '.join(EXECUTORS)}")
    outcome = run_sweep(runs, root, executor=args.executor, address=args.address, cpus_per_run=args.cpus_per_run)
    done = sum(status_of(r.run_dir) == "complete" for r in runs)
    refused = [k for k, v in outcome.items() if v.startswith("refused")]
    elsewhere = len(runs) - done - len(refused)
    print(f"sweep: {done}/{len(runs)} runs complete in {root}" + (f"; {len(refused)} refused" if refused else "")
          + (f"; {elsewhere} being run by another process" if elsewhere else ""), file=sys.stdout)
    if done == 0 and not elsewhere:
        raise BenchError(f"every run of the sweep was refused (see the lines above); nothing was run in {root}")
    return 0
