"""Sweeps: a grid of method x reward x variant x seed, run into the store, resumable.

    python -m bench sweep --methods alignprop ddpo --seeds 0 1 2 --reward saturation [--set k=v ...] [--root DIR]
    python -m bench sweep --file sweep.yaml        # keys: methods, seeds, rewards (or reward), set, variants, root

``variants`` (sweep files only) is a list of arms, each a list of ``KEY=VALUE`` overrides applied on top of ``set``:
one method under several settings, e.g. the DDE credit study's four weightings.

A run's identity is a hash of its resolved config (``bench.config.resolve(method, overrides)``): the
same resolved config is the same run, and its folder is ``<root>/<method>-<reward>-seed<S>-<hash>``.
So running a sweep again

- skips every run whose manifest says ``complete``,
- resumes (``bench.run.resume``) every run that was interrupted (manifest ``running``), from its
  last checkpoint, and
- starts the runs that have no folder yet,

which makes an interrupted sweep continue where it stopped.  Each run is taken under its folder's writer lock
(``RunFolder.lock``): a run that another process is writing is skipped ("being run by process N"), so two sweep
drivers on one folder share the work and no run is run twice.  A ``--set`` override whose first key is
another method's section (``alignprop.lr=...`` in a sweep that also runs ``ddpo``) applies to that
method only.  ``<root>/sweep.json`` lists the sweep's runs and their status (what ``bench compare``,
``table`` and ``report`` read when given the sweep folder).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import yaml

from bench import run
from bench.config import identity, resolve
from diffalign import store
from diffalign.errors import BenchError
from diffalign.store import FolderBusy, RunFolder, safe_name
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


def run_sweep(runs: list[PlannedRun], root: str, log=print) -> dict[str, str]:
    """Run (or skip, or resume) every planned run in order; returns run_id -> outcome."""
    for r in runs:
        _check_identity(r)
    os.makedirs(root, exist_ok=True)
    outcome: dict[str, str] = {}
    write_index(root, runs, outcome)
    crash_step = os.environ.get(run.CRASH_ENV)
    crash_run = os.environ.get(SWEEP_CRASH_RUN_ENV)
    for i, r in enumerate(runs, 1):
        if crash_run is not None:  # tests: only the chosen run is killed by the harness's crash switch
            if i == int(crash_run) and crash_step:
                os.environ[run.CRASH_ENV] = crash_step
            else:
                os.environ.pop(run.CRASH_ENV, None)
        what = f"[{i}/{len(runs)}] {r.method} {r.reward} seed {r.seed} ({os.path.basename(r.run_dir)})"
        folder = RunFolder(r.run_dir)
        try:
            with folder.lock(run.warn):  # this driver's run now; another driver skips it
                state = status_of(r.run_dir)
                if state == "complete":
                    log(f"{what}: complete, skipped")
                    outcome[r.run_id] = "complete"
                    continue
                if state == "interrupted":
                    log(f"{what}: interrupted, resuming")
                    run.resume(r.run_dir, locked=True)
                else:
                    log(f"{what}: running")
                    run.start(r.cfg, r.run_dir, locked=True)
                outcome[r.run_id] = "complete"
        except FolderBusy as e:
            log(f"{what}: being run by another process, skipped ({e})")
        except BenchError as e:  # e.g. a method that needs a differentiable reward: this run only
            log(f"{what}: refused: {e}")
            outcome[r.run_id] = f"refused: {e}"
        write_index(root, runs, outcome)
    return outcome


def load_file(path: str) -> dict:
    """A sweep YAML: ``methods``, ``seeds``, ``rewards`` (or ``reward``), ``set`` (list of KEY=VALUE), ``root``."""
    if not os.path.isfile(path):
        raise BenchError(f"sweep file {path!r} does not exist; accepted: a YAML file with methods, seeds, rewards, set")
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise BenchError(f"sweep file {path!r} is not valid YAML ({str(e).splitlines()[0]})") from None
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
    outcome = run_sweep(runs, root)
    done = sum(status_of(r.run_dir) == "complete" for r in runs)
    refused = [k for k, v in outcome.items() if v.startswith("refused")]
    elsewhere = len(runs) - done - len(refused)
    print(f"sweep: {done}/{len(runs)} runs complete in {root}" + (f"; {len(refused)} refused" if refused else "")
          + (f"; {elsewhere} being run by another process" if elsewhere else ""), file=sys.stdout)
    if done == 0 and not elsewhere:
        raise BenchError(f"every run of the sweep was refused (see the lines above); nothing was run in {root}")
    return 0
