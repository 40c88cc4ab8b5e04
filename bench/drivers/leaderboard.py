"""The benchmark's own protocol: every method on every reward of a declared protocol, matched budget, one table.

    python -m bench leaderboard [--protocol bench/protocols/tiny-v1.yaml] [--executor local|ray] [--address A]
    python -m bench leaderboard --tables-only      # the tables and figures from what has finished so far
    python -m bench leaderboard --tables-only --readme README.md   # and the README's summary (between its markers)
    make leaderboard                               # the same, from nothing

A protocol file (``bench/protocols/<name>.yaml``) names the rewards, the seeds, the budget in training images, the
settings every run shares (the evaluation), and per method the lines that give it the budget (and where its preset's
settings were tuned).  The leaderboard is a sweep (``bench.drivers.sweep``: the same per-run code, folders, hashes,
locks and resume) over seed x reward x method, seed-major, so an interrupted leaderboard holds whole seeds first;
rerunning it skips what is complete and resumes what was killed.  A method whose settings cannot train on a reward
(AlignProp on a non-differentiable one) is refused by the harness with one line; the table shows that line instead of
a number.  A reward-free method (``reward_free: true``: OGDM) runs once per seed and is scored on every protocol
reward by the same evaluation (the protocol's ``eval.metrics`` hold every protocol reward).

What the tables say, per reward, per method (its runs over the protocol's seeds):

- **final**: the final eval reward, mean +- SE over seeds (SE over seeds; one seed: that run's per-image SE);
- **gain in SE**: the gain over the base model (the step-0 evaluation, the same images for every run) in units of its
  standard error.  The eval prompts and noise are the same before and after, so the gain is paired per image:
  ``g[s, i]`` = image i's reward after training seed s minus before, ``G`` = its mean, and
  ``SE(G)^2 = var_s(mean_i g) / S + var_i(mean_s g) / I`` (training seeds and eval images both sampled; the first
  term is dropped with one seed).  ``beats base`` = G / SE(G) > 3;
- held-out metrics at the end (prompt fidelity, tiny-rating, tiny-clip, FD at the protocol's NFE, KL to base) and
  their change from the base model (fidelity's SE: binomial over the eval images, combined with the SE over seeds);
- cost: images generated, UNet passes (forward + backward, in images), wall time of the run;
- **cost to threshold**: the images and wall time to a gain of ``sigma`` SE (the seed's own paired gain over its
  per-image SE); the protocol evaluates at the start and the end only, so this is the budget's cost for the seeds that
  reach it (their count shown) and ``not reached`` otherwise;
- **rank**: by final eval reward among the methods with a number on that reward;
- **hacking flag**: gain in SE > ``hacking.sigma`` while fidelity or a watched held-out metric
  (``hacking.watch``) changes by less than ``-sigma`` SE (paired, as the gain, for per-image metrics).

**Version 2** (a protocol with ``budgets``, ``tuning`` and ``gold``: ``bench/protocols/tiny-v2.yaml``; the rules in
docs/leaderboard-v2.md): every run trains to the largest budget and is evaluated at each budget on the way
(``eval.at``); before the evaluation runs, every method's ``search`` configurations are run on the tuning reward with a
training seed and eval noise seeds (``eval.first_seed``) of their own, and the rule (``best-final``: the highest final
eval reward, ties to the earlier configuration) picks one, frozen for every reward and seed (:func:`tuning_choice`;
a method's evaluation runs are planned once its tuning has ended).  ``bench.outputs.budgets`` computes the curves, the
area ranking, the extrapolated crossings and the over-optimisation flag; ``leaderboard.md`` opens with them, then the
tables below at the largest budget.

The overall table: per method, mean rank over the rewards it ran on, the rewards it beats the base model on, flags,
and its mean cost per run.  ``leaderboard.json`` in the root keeps the protocol (and its hash), every driver session
(start, end, machine, executor, runs complete before and after) and the numbers; ``leaderboard.md`` the tables;
``gains.png`` / ``.svg`` the figure (gain in SE per method, a panel per reward, the 3-SE line drawn);
``leaderboard.html`` the tables and the figure as one page (``bench.outputs.leaderboard_page``: its rows ranked by the
gain in SE, the quantity bold marks; refusals in rows of their own); ``summary.md`` a line per method (what the
README shows, between its ``<!-- leaderboard NAME -->`` markers, with ``--readme``).
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import sys
import time

import numpy as np
import pandas as pd
import yaml

from bench.drivers import sweep
from bench.outputs import budgets, leaderboard_page
from bench.outputs.budgets import paired_se
from bench.outputs.compare import RunData
from bench.outputs.leaderboard_page import fmt
from diffalign import store
from diffalign.errors import BenchError
from methods import method_module

DEFAULT_PROTOCOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "protocols",
                                "tiny-v1.yaml")
PROTOCOL_KEYS = {"name", "version", "rewards", "seeds", "budget_images", "set", "methods", "hacking", "root",
                 "budgets", "tuning", "gold"}
METHOD_KEYS = {"set", "tuned", "reward_free", "images_per_step", "steps", "search"}
TUNING_KEYS = {"reward", "seed", "eval_first_seed", "rule"}
TUNING_RULES = ("best-final",)
FD_COL = "fd_nfe"


# ---- the protocol ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Protocol:
    name: str
    version: int
    rewards: list[str]
    seeds: list[int]
    budget_images: int
    common: list[str]
    methods: dict[str, dict]
    sigma: float
    watch: list[str]
    root: str
    text: str  # the file as read (its hash identifies the protocol)
    budgets: list[int] = dataclasses.field(default_factory=list)  # version 2: the budget curve's points
    tuning: dict | None = None  # version 2: {reward, seed, eval_first_seed, rule}
    gold: dict = dataclasses.field(default_factory=dict)  # version 2: training reward -> its held-out gold metric

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:12]


def load_protocol(path: str, root: str | None = None) -> Protocol:
    """A protocol YAML, checked key by key (one line naming what is wrong and what is accepted)."""
    if not os.path.isfile(path):
        raise BenchError(f"protocol file {path!r} does not exist; accepted: a YAML file like {DEFAULT_PROTOCOL}")
    with open(path) as f:
        text = f.read()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise BenchError(f"protocol file {path!r} is not valid YAML: {store.yaml_problem(e)}; accepted: a YAML file "
                         f"like {DEFAULT_PROTOCOL}") from None
    if not isinstance(data, dict) or set(data) - PROTOCOL_KEYS or {"name", "version", "rewards", "methods"} - set(data):
        got = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise BenchError(f"protocol file {path!r} has keys {got}; accepted: {', '.join(sorted(PROTOCOL_KEYS))} "
                         "(name, version, rewards and methods required)")
    methods = data["methods"]
    if not isinstance(methods, dict) or not methods:
        raise BenchError(f"protocol file {path!r}: methods must map each method to its settings "
                         "(set: [KEY=VALUE ...], tuned: TEXT, reward_free: true|false)")
    for m, spec in methods.items():
        method_module(m)  # unknown method -> one line
        spec = methods[m] = dict(spec or {})
        if set(spec) - METHOD_KEYS:
            raise BenchError(f"protocol file {path!r}: method {m!r} has keys {sorted(spec)}; accepted: "
                             f"{', '.join(sorted(METHOD_KEYS))}")
        spec["set"] = [str(s) for s in spec.get("set", [])]
    hacking = data.get("hacking") or {}
    try:
        seeds = [int(s) for s in data.get("seeds", [0])]
        version = int(data["version"])
        budgets = [int(b) for b in data.get("budgets") or []]
    except (TypeError, ValueError):
        raise BenchError(f"protocol file {path!r}: seeds, version and budgets must be integers") from None
    if budgets and (sorted(set(budgets)) != budgets or budgets[0] < 1):
        raise BenchError(f"protocol file {path!r}: budgets {budgets}; accepted: increasing positive integers "
                         "(training images)")
    tuning = data.get("tuning")
    if tuning is not None and (not isinstance(tuning, dict) or set(tuning) - TUNING_KEYS or "reward" not in tuning
                               or tuning.get("rule", TUNING_RULES[0]) not in TUNING_RULES):
        raise BenchError(f"protocol file {path!r}: tuning {tuning!r}; accepted: a mapping with reward (required), "
                         f"seed, eval_first_seed and rule ({', '.join(TUNING_RULES)})")
    if tuning is not None:
        tuning = {"seed": 1000, "eval_first_seed": 1000, "rule": TUNING_RULES[0], **tuning}
        if int(tuning["seed"]) in seeds:
            raise BenchError(f"protocol file {path!r}: tuning seed {tuning['seed']} is an evaluation seed; accepted: "
                             f"a seed not in {seeds}")
        lines = [str(x) for x in data.get("set", [])]
        n = next((int(x.split("=", 1)[1]) for x in lines if x.startswith("eval.num_seeds=")), 8)
        first = next((int(x.split("=", 1)[1]) for x in lines if x.startswith("eval.first_seed=")), 0)
        if first <= int(tuning["eval_first_seed"]) < first + n:
            raise BenchError(f"protocol file {path!r}: tuning eval_first_seed {tuning['eval_first_seed']} is one of "
                             f"the evaluation's noise seeds {first}..{first + n - 1}; accepted: one outside them")
    for m, spec in methods.items():
        if budgets and not spec.get("reward_free") and not (spec.get("images_per_step") or spec.get("steps")):
            raise BenchError(f"protocol file {path!r}: method {m!r} has no images_per_step or steps; accepted: one "
                             "of them with budgets (how its steps meet each budget)")
        if budgets and spec.get("reward_free") and not spec.get("steps"):
            raise BenchError(f"protocol file {path!r}: reward-free method {m!r} needs steps: with budgets")
        spec["search"] = [[str(x) for x in (c or [])] for c in spec.get("search") or [[]]]
    sizes = {m: len(spec["search"]) for m, spec in methods.items()}
    if tuning is not None and len(set(sizes.values())) != 1:
        raise BenchError(f"protocol file {path!r}: search sizes {sizes}; accepted: the same number of configurations "
                         "for every method (equal tuning)")
    gold = {str(k): str(v) for k, v in (data.get("gold") or {}).items()}
    return Protocol(name=str(data["name"]), version=version, rewards=[str(r) for r in data["rewards"]], seeds=seeds,
                    budget_images=budgets[-1] if budgets else int(data.get("budget_images", 0)),
                    common=[str(s) for s in data.get("set", [])],
                    methods=methods, sigma=float(hacking.get("sigma", 3.0)), watch=list(hacking.get("watch", [])),
                    root=root or str(data.get("root") or os.path.join(store.RESULTS_ROOT, "leaderboards",
                                                                      str(data["name"]))),
                    text=text, budgets=budgets, tuning=tuning, gold=gold)


def budget_steps(p: Protocol, method: str) -> list[int]:
    """The steps at which a method's runs reach each budget (the protocol's comment says the rule): ceil(b / k) with
    ``images_per_step: k``; with ``steps: N`` (images drawn before training, or none) N at the largest budget and
    the same fractions of N at the others."""
    spec = p.methods[method]
    if spec.get("images_per_step"):
        k = int(spec["images_per_step"])
        steps = [max(1, math.ceil(b / k)) for b in p.budgets]
    else:
        n = int(spec["steps"])
        steps = [max(1, round(n * b / p.budgets[-1])) for b in p.budgets]
    if len(set(steps)) != len(steps):
        raise BenchError(f"method {method!r} meets budgets {p.budgets} at steps {steps}: two budgets fall on one "
                         "step; accepted: images_per_step or steps that give each budget a step of its own")
    return steps


def method_settings(p: Protocol, method: str, config: list[str] | None = None) -> list[str]:
    """What a method's run gets: the protocol's common lines, the method's own, the budget's steps and evaluation
    points (version 2), and a search configuration (the tuned one for the evaluation runs)."""
    spec = p.methods[method]
    extra = []
    if p.budgets:
        steps = budget_steps(p, method)
        extra = [f"steps={steps[-1]}", f"eval.at=[{', '.join(str(s) for s in steps[:-1])}]"]
    return p.common + spec["set"] + extra + list(config or [])


def tuning_root(p: Protocol) -> str:
    return os.path.join(p.root, "tuning")


def plan_tuning(p: Protocol) -> list[sweep.PlannedRun]:
    """Every tuning run: each method x each configuration of its search, on the tuning reward, with the tuning seed
    for training and the tuning eval noise (``eval.first_seed``), method-major."""
    if not p.tuning:
        return []
    t = p.tuning
    runs = []
    for method, spec in p.methods.items():
        for config in spec["search"]:
            sets = method_settings(p, method, config) + [f"eval.first_seed={t['eval_first_seed']}"]
            runs += sweep._plan_seeds(method, t["reward"], [int(t["seed"])], sets, tuning_root(p))
    return runs


def tuning_choice(p: Protocol, method: str, refused: dict | None = None) -> dict | None:
    """The rule's pick for a method once every configuration's tuning run has ended (complete or refused), else None:
    ``{"index", "config", "scores": [final tuning reward or None per configuration], "rule"}``.  ``best-final``: the
    highest eval reward on the tuning reward at the largest budget; ties to the earlier configuration."""
    refused = refused if refused is not None else _read_log(p).get("refused", {})
    spec = p.methods[method]
    runs = [r for r in plan_tuning(p) if r.method == method]
    scores = []
    for r in runs:
        state = sweep.status_of(r.run_dir)
        if state == "complete":
            scores.append(_final(RunData.read(r.run_dir), "eval_reward_mean"))
        elif r.run_id in refused:
            scores.append(None)
        else:
            return None
    ok = [(s, -i) for i, s in enumerate(scores) if s is not None and not math.isnan(s)]
    if not ok:
        return {"index": None, "config": None, "scores": scores, "rule": p.tuning["rule"]}
    best = -max(ok)[1]
    return {"index": best, "config": spec["search"][best], "scores": scores, "rule": p.tuning["rule"],
            "run_dirs": [r.run_dir for r in runs]}


def plan(p: Protocol, refused: dict | None = None) -> list[sweep.PlannedRun]:
    """Every run of the protocol that can be planned now: the tuning runs first (with ``tuning``), then the evaluation
    runs seed-major (seed, then reward, then method) of every method whose tuning has ended (its chosen configuration
    frozen); a reward-free method once per seed, under the protocol's first reward (its evaluation scores them all)."""
    runs = plan_tuning(p)
    configs = {}
    for method in p.methods:
        if p.tuning:
            choice = tuning_choice(p, method, refused)
            if choice is None or choice["index"] is None:
                continue
            configs[method] = choice["config"]
        else:
            configs[method] = []
    for seed in p.seeds:
        for i, reward in enumerate(p.rewards):
            for method, spec in p.methods.items():
                if method not in configs or (spec.get("reward_free") and i > 0):
                    continue
                runs += sweep._plan_seeds(method, reward, [seed], method_settings(p, method, configs[method]), p.root)
    return runs


def evaluation_runs(p: Protocol, runs: list[sweep.PlannedRun]) -> list[sweep.PlannedRun]:
    """The planned runs that are not tuning runs."""
    return [r for r in runs if os.path.dirname(r.run_dir) != tuning_root(p)]


# ---- running it -----------------------------------------------------------------------------------------------

def machine() -> dict:
    import torch

    return {"host": platform.node(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def _log_path(p: Protocol) -> str:
    return os.path.join(p.root, "leaderboard.json")


def _read_log(p: Protocol) -> dict:
    path = _log_path(p)
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def run(p: Protocol, executor: str = "local", address: str | None = None, cpus_per_run: float = 1,
        log=print) -> dict[str, str]:
    """Run (skip, resume) every run of the protocol; each driver session is logged in ``leaderboard.json``."""
    runs = plan(p)
    os.makedirs(p.root, exist_ok=True)
    before = sum(sweep.status_of(r.run_dir) == "complete" for r in runs)
    session = {"id": f"{platform.node()}:{os.getpid()}:{time.time():.0f}",
               "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "end": None,
               "executor": executor, "machine": machine(), "complete_before": before, "runs": len(runs)}
    t0 = time.time()
    _log_session(p, session)  # logged at its start: a driver killed mid-way leaves its start, and no end
    log(f"leaderboard {p.name} (version {p.version}): {len(runs)} runs planned so far, {before} complete, into "
        f"{p.root}")
    outcome: dict[str, str] = {}
    done: set[str] = set()
    while True:  # the tuning runs end -> their methods' evaluation runs can be planned: until nothing new appears
        todo = [r for r in runs if r.run_id not in done]
        if not todo:
            break
        for root in sorted({os.path.dirname(r.run_dir) for r in todo}, key=lambda d: d != tuning_root(p)):  # tuning 1st
            here = [r for r in todo if os.path.dirname(r.run_dir) == root]
            outcome.update(sweep.run_sweep(here, root, log=log, executor=executor, address=address,
                                           cpus_per_run=cpus_per_run))
        done |= {r.run_id for r in todo}
        refused = {**_read_log(p).get("refused", {}), **{k: v for k, v in outcome.items() if v.startswith("refused")}}
        _log_session(p, session, {k: v for k, v in outcome.items() if v.startswith("refused")})
        runs = plan(p, refused)
    if p.tuning:
        _log_choices(p)
    session.update(end=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                   seconds=round(time.time() - t0, 1),
                   complete_after=sum(sweep.status_of(r.run_dir) == "complete" for r in runs))
    _log_session(p, session, {k: v for k, v in outcome.items() if v.startswith("refused")})
    return outcome


def _log_choices(p: Protocol) -> None:
    """The tuning rule's pick per method, as far as the tuning has ended, into ``leaderboard.json``."""
    data = _read_log(p)
    refused = data.get("refused", {})
    data["tuning"] = {m: tuning_choice(p, m, refused) for m in p.methods}
    _write_log(p, data)


def _log_session(p: Protocol, session: dict, refused: dict | None = None) -> None:
    """Add or update one driver session in ``leaderboard.json`` (re-read first: other drivers write it too)."""
    data = _read_log(p)
    sessions = [s for s in data.get("sessions", []) if s.get("id") != session["id"]]
    data["sessions"] = sessions + [dict(session)]
    data["refused"] = {**data.get("refused", {}), **(refused or {})}
    _write_log(p, data)


def _write_log(p: Protocol, data: dict) -> None:
    data.update(protocol={"name": p.name, "version": p.version, "hash": p.digest, "text": p.text})
    store.atomic_write_json(_log_path(p), data)


# ---- the numbers ----------------------------------------------------------------------------------------------

def _paired(runs: list[RunData], column: str) -> tuple[float, float, float, float]:
    """(base mean, final mean, gain G, SE(G)) of a per-image eval column over the runs (seeds), paired per image
    (module docstring); NaN where a run has no such column."""
    gains, base, final = [], [], []
    for r in runs:
        s = pd.read_parquet(r.folder.file(r.folder.EVAL_SAMPLES + ".parquet"))
        col = "reward" if column == r.reward else column
        if col not in s:
            return (math.nan,) * 4
        last = int(s["step"].max())
        a = s[s["step"] == 0].sort_values(["prompt", "seed"])[col].to_numpy(float)
        b = s[s["step"] == last].sort_values(["prompt", "seed"])[col].to_numpy(float)
        if last == 0 or len(a) != len(b):
            return (math.nan,) * 4
        gains.append(b - a)
        base.append(a.mean())
        final.append(b.mean())
    g = np.stack(gains)  # seeds x images
    return float(np.mean(base)), float(np.mean(final)), float(g.mean()), paired_se(g)


def _final(r: RunData, col: str) -> float:
    v = r.df[col].dropna() if col in r.df else pd.Series(dtype=float)
    return float(v.iloc[-1]) if len(v) else math.nan


# How far a crossing is extrapolated before the line says only "not within this many times the largest budget": a
# line through four points 8x apart says little about 1000x beyond them.
CROSSING_HORIZON = 64


def _busy_wall_s(run_dirs: list[str]) -> float:
    """Wall time during which at least one of these (complete) runs was computing: the length of the union of the
    intervals [end - wall, end], a run's end time (its manifest) and its wall time (its last metrics row, which adds
    up the sessions of a resumed run).  Drivers running side by side overlap, so this is less than the sum of the run
    wall times; work lost by a killed run since its last checkpoint, and the gaps between runs, are not in it."""
    spans = []
    for d in run_dirs:
        r = RunData.read(d)
        end, wall = r.manifest.get("end_time"), _final(r, "wall_time")
        if end and not math.isnan(wall):
            t = datetime.datetime.fromisoformat(end).timestamp()
            spans.append((t - wall, t))
    total, reach = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def _first(r: RunData, col: str) -> float:
    v = r.df[col].dropna() if col in r.df else pd.Series(dtype=float)
    return float(v.iloc[0]) if len(v) else math.nan


def _mean_se(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if not math.isnan(x)], dtype=float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def _eval_images(r: RunData) -> int:
    s = pd.read_parquet(r.folder.file(r.folder.EVAL_SAMPLES + ".parquet"), columns=["step"])
    return int((s["step"] == 0).sum())


def _fidelity_change(runs: list[RunData]) -> tuple[float, float, float]:
    """(final fidelity, change from base, change in SE): fidelity is a proportion of the eval images, its SE
    binomial, combined with the SE over seeds where there are several."""
    base = float(np.mean([_first(r, "fidelity") for r in runs]))
    final, seed_se = _mean_se([_final(r, "fidelity") for r in runs])
    if math.isnan(base) or math.isnan(final):
        return math.nan, math.nan, math.nan
    n = _eval_images(runs[0])
    binom = lambda p: p * (1 - p) / (n * len(runs))  # noqa: E731
    se = math.sqrt(binom(base) + (seed_se ** 2 if not math.isnan(seed_se) else binom(final)))
    return final, final - base, (final - base) / se if se > 0 else 0.0


def _metric_column(metric: str) -> str:
    """The eval_samples column of a watched metric name (``eval_tiny-rating_mean`` -> ``tiny-rating``)."""
    return metric[len("eval_"):-len("_mean")] if metric.startswith("eval_") and metric.endswith("_mean") else metric


def cell(p: Protocol, runs: list[RunData], reward: str) -> dict:
    """One method's numbers on one reward (module docstring)."""
    base, final_paired, gain, gain_se = _paired(runs, reward)
    finals = [_final(r, "eval_reward_mean") if r.reward == reward else _final(r, f"eval_{reward}_mean") for r in runs]
    final, final_se = _mean_se(finals)
    if math.isnan(final_se):  # one seed: that run's per-image SE
        col = "eval_reward_sem" if runs[0].reward == reward else f"eval_{reward}_sem"
        final_se = _final(runs[0], col)
    own = [_paired([r], reward) for r in runs]
    reached = [g > p.sigma * se for _, _, g, se in own]  # this seed's own gain over its per-image SE
    row = {"seeds": len(runs), "trained_on": runs[0].reward if not _reward_free(p, runs[0].method) else "(none)",
           "final": final, "final_se": final_se, "base": base, "gain": gain, "gain_se": gain_se,
           "gain_in_se": gain / gain_se if gain_se > 0 else math.nan, "reached": sum(reached)}
    row["beats_base"] = bool(row["gain_in_se"] > p.sigma)
    row["fidelity"], row["fidelity_change"], row["fidelity_change_in_se"] = _fidelity_change(runs)
    for metric in ("tiny-rating", "tiny-clip"):
        if metric != reward:
            b, f, g, se = _paired(runs, metric)
            row[metric], row[f"{metric}_change_in_se"] = f, g / se if se > 0 else math.nan
    fd = sorted(c for c in runs[0].df.columns if c.startswith(FD_COL))
    for c in fd:
        row[c], row[f"{c}_base"] = _mean_se([_final(r, c) for r in runs])[0], _first(runs[0], c)
    row["kl_to_base"] = _mean_se([_final(r, "kl_to_base") for r in runs])[0]
    row["images"] = _mean_se([_final(r, "images") for r in runs])[0]
    row["unet_passes"] = _mean_se([_final(r, "unet_fwd") + _final(r, "unet_bwd") for r in runs])[0]
    row["wall_time_s"] = _mean_se([_final(r, "wall_time") for r in runs])[0]
    hits = [r for r, ok in zip(runs, reached) if ok]
    row["images_to_threshold"] = _mean_se([_final(r, "images") for r in hits])[0] if hits else math.nan
    row["wall_time_to_threshold_s"] = _mean_se([_final(r, "wall_time") for r in hits])[0] if hits else math.nan
    row["hacking"] = _hacking(p, row, runs, reward)
    row["diagnosis"] = "" if row["beats_base"] else _diagnosis(p, runs)
    return row


def _series_ends(runs: list[RunData], col: str) -> tuple[float, float]:
    """The mean over seeds of a training metric's first and last logged values."""
    firsts, lasts = [], []
    for r in runs:
        v = r.df[col].dropna() if col in r.df else pd.Series(dtype=float)
        if len(v):
            firsts.append(float(v.iloc[0]))
            lasts.append(float(v.iloc[-1]))
    return (float(np.mean(firsts)), float(np.mean(lasts))) if firsts else (math.nan, math.nan)


def _batch_z(r: RunData) -> float:
    """A run's training-batch reward change, last step minus first, in units of the two batches' standard error."""
    d = r.df.dropna(subset=["reward_mean", "reward_std"])
    if len(d) < 2:
        return math.nan
    n = max(float(d["images"].iloc[0]), 1.0)  # the first step's images: one step's batch
    se = math.sqrt((d["reward_std"].iloc[0] ** 2 + d["reward_std"].iloc[-1] ** 2) / n)
    return float((d["reward_mean"].iloc[-1] - d["reward_mean"].iloc[0]) / se) if se > 0 else math.nan


def _diagnosis(p: Protocol, runs: list[RunData]) -> str:
    """One measured line for a method that did not beat the base model: what its own training signal did (the
    training batches' reward for the sampling methods, rose / fell / stayed flat = beyond +-2 of its SE; the implicit
    preference accuracy for the pair methods, "fits its pairs" = 0.75 or more at the end) and how far it moved from the
    base model (KL); ``build`` adds how that KL compares with the methods that did gain."""
    if _reward_free(p, runs[0].method):
        return "reward-free: this reward was never its objective; the change is a side effect of its own training"
    parts = []
    if "reward_mean" in runs[0].df:
        a, b = _series_ends(runs, "reward_mean")
        z = float(np.nanmean([_batch_z(r) for r in runs]))
        trend = "rose" if z > 2 else "fell" if z < -2 else "stayed flat"
        parts.append(f"its training batches' reward {trend} ({a:.3g} -> {b:.3g}, {z:+.1f} batch SE, first -> last "
                     "step)")
    if "implicit_accuracy" in runs[0].df:
        # the end only: at the first step the policy is its reference and the accuracy is undefined (chance: 0.5;
        # runs recorded before that was logged as NaN hold 0.00 there)
        b = _series_ends(runs, "implicit_accuracy")[1]
        acc = f"implicit preference accuracy {b:.2f} at the end, chance 0.5"
        parts.append(f"it fits its pairs ({acc}) but the eval reward did not follow" if b >= 0.75
                     else f"it does not fit its pairs ({acc})")
    skipped = sum(_final(r, "skipped_updates") for r in runs)
    if skipped:
        parts.append(f"{skipped:.0f} updates skipped (non-finite)")
    return "; ".join(parts)


def _hacking(p: Protocol, row: dict, runs: list[RunData], reward: str) -> str:
    """The flag (module docstring): which watched metrics lost more than sigma SE while the reward gained."""
    if _reward_free(p, runs[0].method) or not row["gain_in_se"] > p.sigma:
        return ""
    lost = []
    for metric in p.watch:
        z = row["fidelity_change_in_se"] if metric == "fidelity" else row.get(f"{_metric_column(metric)}_change_in_se")
        if z is not None and not math.isnan(z) and z < -p.sigma:
            lost.append(f"{_metric_column(metric)} {z:+.1f} SE")
    return ", ".join(lost)


def _reward_free(p: Protocol, method: str) -> bool:
    return bool(p.methods.get(method, {}).get("reward_free"))


def build(p: Protocol) -> dict:
    """Every cell of the leaderboard from the runs complete so far: {reward: {method: cell or status}}, overall;
    version 2 adds ``budgets`` (:func:`budget_board`)."""
    refused = _read_log(p).get("refused", {})
    runs = evaluation_runs(p, plan(p, refused))
    complete: dict[tuple[str, str], list[RunData]] = {}
    status: dict[tuple[str, str], list[str]] = {}
    for r in runs:
        state = sweep.status_of(r.run_dir)
        rewards = p.rewards if _reward_free(p, r.method) else [r.reward]
        for reward in rewards:
            status.setdefault((reward, r.method), []).append(
                "refused" if r.run_id in refused and state == "new" else state)
            if state == "complete":
                complete.setdefault((reward, r.method), []).append(RunData.read(r.run_dir))
    table: dict[str, dict[str, dict]] = {}
    for reward in p.rewards:
        table[reward] = {}
        for method in p.methods:
            got = complete.get((reward, method), [])
            states = status.get((reward, method), [])
            if got:
                entry = cell(p, sorted(got, key=lambda r: r.seed), reward)
            else:
                entry = {"seeds": 0}
            entry["planned"] = len(states)
            if "refused" in states:
                reason = next((v for k, v in refused.items() if any(r.run_id == k and r.method == method
                                                                    and r.reward == reward for r in runs)), "refused")
                entry["refused"] = reason.removeprefix("refused: ")
            table[reward][method] = entry
        gainers = [e["kl_to_base"] for e in table[reward].values() if e.get("beats_base")]
        for e in table[reward].values():
            if e.get("seeds") and not e.get("beats_base") and not math.isnan(e.get("kl_to_base", math.nan)):
                kl = f"KL to base {e['kl_to_base']:.3g}"
                if gainers:
                    kl += f" ({e['kl_to_base'] / float(np.median(gainers)):.2g}x the median of the methods that gained)"
                e["diagnosis"] = "; ".join(x for x in (e["diagnosis"], kl) if x)
        ranked = sorted((m for m, e in table[reward].items() if e.get("seeds")),
                        key=lambda m: -table[reward][m]["final"])
        for i, m in enumerate(ranked, 1):
            table[reward][m]["rank"] = i
    overall = {}
    for method in p.methods:
        cells = [table[rw][method] for rw in p.rewards if table[rw][method].get("seeds")]
        overall[method] = {
            "rewards_run": len(cells),
            "mean_rank": float(np.mean([c["rank"] for c in cells])) if cells else math.nan,
            "beats_base_on": [rw for rw in p.rewards if table[rw][method].get("beats_base")],
            "hacking_on": [rw for rw in p.rewards if table[rw][method].get("hacking")],
            "refused_on": [rw for rw in p.rewards if table[rw][method].get("refused")],
            "wall_time_s": float(np.mean([c["wall_time_s"] for c in cells])) if cells else math.nan,
            "images": float(np.mean([c["images"] for c in cells])) if cells else math.nan,
        }
    done = sum(sweep.status_of(r.run_dir) == "complete" for r in runs)
    finished = [r.run_dir for r in runs if sweep.status_of(r.run_dir) == "complete"]
    board = {"table": table, "overall": overall, "runs_complete": done, "runs_planned": len(runs),
             "compute_s": float(sum(_final(RunData.read(d), "wall_time") for d in finished))}
    if p.tuning:
        tuned = [r.run_dir for r in plan_tuning(p) if sweep.status_of(r.run_dir) == "complete"]
        board["tuning_runs_complete"], board["tuning_runs_planned"] = len(tuned), len(plan_tuning(p))
        board["tuning_compute_s"] = float(sum(_final(RunData.read(d), "wall_time") for d in tuned))
        finished += tuned
    board["busy_wall_s"] = _busy_wall_s(finished)
    if p.budgets:
        board["budgets"] = budget_board(p, complete, refused)
        board["runs_planned"] = len(p.seeds) * sum(1 if spec.get("reward_free") else len(p.rewards)
                                                   for spec in p.methods.values())
        for reward in p.rewards:  # the crossing, extrapolated, joins the measured line of a method without a gain
            for method, e in table[reward].items():
                cur = board["budgets"]["curves"].get(reward, {}).get(method)
                if e.get("seeds") and not e.get("beats_base") and cur and not _reward_free(p, method):
                    x, far = cur["crossing"], CROSSING_HORIZON * p.budgets[-1]
                    e["diagnosis"] = "; ".join(t for t in (e.get("diagnosis"), (
                        "its curve does not rise with the budget (no crossing to extrapolate)" if not x else
                        f"extrapolated, not measured: its curve would cross {p.sigma:g} SE at about {x:.3g} training "
                        "images (a line in log2 images through its points)" if x <= far else
                        f"extrapolated, not measured: its curve rises too slowly to cross {p.sigma:g} SE within "
                        f"{CROSSING_HORIZON}x the largest budget ({far} training images; a line in log2 images through "
                        "its points)")) if t)
    return board


def _eval_samples(r: RunData) -> pd.DataFrame:
    return pd.read_parquet(r.folder.file(r.folder.EVAL_SAMPLES + ".parquet"))


def budget_board(p: Protocol, complete: dict, refused: dict) -> dict:
    """Version 2's numbers (``bench.outputs.budgets`` says how each is computed): per reward and method the curve
    over the budgets, its area and extrapolated crossing; per gold reward and method the proxy/gold curve against
    the KL and the over-optimisation flag; the tuning (per method its configurations' final tuning reward and the
    rule's pick) and the transfer (the gain on the tuning reward beside the other rewards)."""
    curves: dict[str, dict] = {}
    overopt: dict[str, dict] = {}
    for reward in p.rewards:
        curves[reward], overopt[reward] = {}, {}
        for method in p.methods:
            runs = sorted(complete.get((reward, method), []), key=lambda r: r.seed)
            if not runs:
                continue
            col = "reward" if runs[0].reward == reward else reward
            samples, metrics = [_eval_samples(r) for r in runs], [r.df for r in runs]
            pts = budgets.curve(samples, metrics, col)
            curves[reward][method] = {"points": pts, "area": budgets.area(pts, p.budgets),
                                      "crossing": budgets.crossing(pts, p.sigma)}
            if reward in p.gold and not _reward_free(p, method):
                overopt[reward][method] = budgets.overoptimisation(samples, metrics, "reward", p.gold[reward], p.sigma)
        ranked = sorted((m for m in curves[reward] if not math.isnan(curves[reward][m]["area"])),
                        key=lambda m: -curves[reward][m]["area"])
        for i, m in enumerate(ranked, 1):
            curves[reward][m]["area_rank"] = i
    tuning = {m: tuning_choice(p, m, refused) for m in p.methods} if p.tuning else {}
    transfer = {}
    if p.tuning:
        tr = p.tuning["reward"]
        for m in p.methods:
            own = complete.get((tr, m))
            others = [rw for rw in p.rewards if rw != tr]
            transfer[m] = {"tuning_reward": tr,
                           "gain_in_se_on_tuning_reward": cell(p, own, tr)["gain_in_se"] if own else math.nan,
                           "others_beaten": [rw for rw in others if complete.get((rw, m))
                                             and cell(p, complete[(rw, m)], rw)["beats_base"]],
                           "others_run": [rw for rw in others if complete.get((rw, m))]}
    return {"budgets": p.budgets, "curves": curves, "overopt": overopt, "tuning": tuning, "transfer": transfer}


# ---- the tables and the figure --------------------------------------------------------------------------------

def markdown(p: Protocol, board: dict, log: dict) -> str:
    sessions = log.get("sessions", [])
    lines = [f"# Leaderboard {p.name} (protocol version {p.version}, hash {p.digest})", "",
             f"{board['runs_complete']} of {board['runs_planned']} runs complete; budget {p.budget_images} training "
             f"images per run; seeds {p.seeds}; rewards {', '.join(p.rewards)}.  Written by `python -m bench "
             f"leaderboard` into `{p.root}`; how each number is computed: `bench/drivers/leaderboard.py`.",
             ""]
    if sessions:
        wall = sum(s.get("seconds") or 0 for s in sessions)
        killed = sum(1 for s in sessions if not s.get("end"))
        machines = sorted({f"{s['machine']['processor']}, {s['machine']['cpus']} CPUs"
                           + (f", {s['machine']['gpu']}" if s["machine"].get("gpu") else "") for s in sessions})
        lines += [f"Driver sessions: {len(sessions)}" + (f" ({killed} interrupted or still running)" if killed else "")
                  + f", {wall / 3600:.2f} h of finished drivers' wall time in all (drivers may overlap); "
                  f"run compute (sum of run wall times) {board['compute_s'] / 3600:.2f} h"
                  + (f", tuning {board['tuning_runs_complete']} of {board['tuning_runs_planned']} runs complete, "
                     f"{board['tuning_compute_s'] / 3600:.2f} h" if "tuning_compute_s" in board else "")
                  + f"; wall time with a run computing (the union of the complete runs' spans"
                  f"{', tuning included' if p.tuning else ''}; drivers side by side overlap) "
                  f"{board['busy_wall_s'] / 3600:.2f} h"
                  + "; machine(s): "
                  f"{'; '.join(machines)}.", ""]
    if p.budgets:
        lines += budgets.markdown_sections(p, board)
        lines += [f"## At the largest budget ({p.budgets[-1]} training images)", ""]
    lines += ["Gain = final eval reward minus the base model's on the same eval images, in SE (paired per image, over "
              "seeds and images); **bold** = beats the base model by more than "
              f"{p.sigma:g} SE.  Hacking flag: gain > {p.sigma:g} SE while "
              f"{' or '.join(_metric_column(w) for w in p.watch)} loses more than {p.sigma:g} SE.  "
              f"To threshold: the cost of the seeds whose own gain exceeds {p.sigma:g} SE "
              "(evaluated at the start and the end only).", ""]
    for reward in p.rewards:
        rows = board["table"][reward]
        any_row = next((e for e in rows.values() if e.get("seeds")), {})
        base = any_row.get("base", math.nan)
        fd_cols = sorted(k for k in any_row if k.startswith(FD_COL) and not k.endswith("_base"))
        held = [m for m in ("tiny-rating", "tiny-clip")
                if any(not math.isnan(e.get(m, math.nan)) for e in rows.values() if e.get("seeds"))]
        lines += [f"## {reward}", "", f"Base model: eval reward {fmt(base, 4)}, fidelity "
                  f"{fmt(any_row.get('fidelity', math.nan) - any_row.get('fidelity_change', math.nan))}"
                  + "".join(f", FD at NFE {c[len(FD_COL):]} {fmt(any_row.get(c + '_base'))}" for c in fd_cols) + ".",
                  ""]
        head = (["rank", "method", "seeds", "final (+- SE)", "gain (SE)", "fidelity (change in SE)"]
                + [f"{m} (change in SE)" for m in held]
                + [f"FD NFE {c[len(FD_COL):]}" for c in fd_cols]
                + ["KL to base", "images", "UNet passes", "wall (s)", "to threshold (images, seeds)", "hacking"])
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        order = sorted(rows, key=lambda m: (rows[m].get("rank", 99), m))
        for m in order:
            e = rows[m]
            if not e.get("seeds"):
                why = f"refused: {e['refused']}" if e.get("refused") else f"not run yet (0 of {e['planned']} seeds)"
                lines.append(f"| - | {m} | 0 | {why} |" + " |" * (len(head) - 4))
                continue
            gain = f"{e['gain_in_se']:+.1f}"
            gain = f"**{gain}**" if e["beats_base"] else gain + (" (no gain)" if e["gain_in_se"] <= 0 else "")
            name = m + (" (reward-free)" if _reward_free(p, m) else "")
            cells = [str(e["rank"]), name, f"{e['seeds']}/{e['planned']}",
                     f"{fmt(e['final'], 4)} +- {fmt(e['final_se'], 2)}", gain,
                     f"{fmt(e['fidelity'])} ({e['fidelity_change_in_se']:+.1f})"]
            cells += [f"{fmt(e[mm])} ({e[mm + '_change_in_se']:+.1f})" for mm in held]
            cells += [fmt(e[c]) for c in fd_cols]
            to = (f"{fmt(e['images_to_threshold'])}, {e['reached']}/{e['seeds']}" if e["reached"] else "not reached")
            cells += [fmt(e["kl_to_base"]), fmt(e["images"]), fmt(e["unet_passes"]), fmt(e["wall_time_s"]), to,
                      e["hacking"] or ""]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        notes = [f"- {m}: {rows[m]['diagnosis']}" for m in order if rows[m].get("seeds") and rows[m].get("diagnosis")]
        if notes:
            lines += ["No gain above " + f"{p.sigma:g} SE, measured (means over seeds):", "", *notes, ""]
    lines += ["## Overall", "", f"| method | mean rank | rewards run | beats base (> {p.sigma:g} SE) on "
              "| hacking flags | refused on | mean images / run | mean wall (s) / run | settings from |",
              "|---|---|---|---|---|---|---|---|---|"]
    for m, o in sorted(board["overall"].items(), key=lambda kv: (math.isnan(kv[1]["mean_rank"]), kv[1]["mean_rank"])):
        lines.append(f"| {m} | {fmt(o['mean_rank'], 2)} | {o['rewards_run']} "
                     f"| {', '.join(o['beats_base_on']) or 'none'} "
                     f"| {', '.join(o['hacking_on']) or '-'} | {', '.join(o['refused_on']) or '-'} "
                     f"| {fmt(o['images'])} | {fmt(o['wall_time_s'])} | {p.methods[m].get('tuned', '')} |")
    return "\n".join(lines) + "\n"


def summary(p: Protocol, board: dict) -> str:
    """Per method, one bullet: the rewards it beats the base model on (gain, and what it cost in fidelity and the
    held-out rating), the rewards it did not (the measured line), refusals, hacking flags.  What the README shows."""
    lines = [f"At {p.budget_images} training images, {len(p.seeds)} seeds ({board['runs_complete']} of "
             f"{board['runs_planned']} runs complete); gain and changes in SE over the base model "
             f"(`{os.path.join(p.root, 'leaderboard.md')}` has every number):", ""]
    if p.budgets:
        b = board["budgets"]
        tuned = sum(1 for c in b["tuning"].values() if c is not None) if p.tuning else 0
        lines[0] = (f"Budgets {', '.join(map(str, p.budgets))} training images, {len(p.seeds)} seeds "
                    f"({board['runs_complete']} of {board['runs_planned']} evaluation runs complete"
                    + (f"; tuning finished for {tuned} of {len(p.methods)} methods, on {p.tuning['reward']}"
                       if p.tuning else "") + "); at the largest budget, gain and changes in SE over the base "
                    f"model (`{os.path.join(p.root, 'leaderboard.md')}` has every budget, the tuning and the "
                    "over-optimisation curves):")
    for m in p.methods:
        wins, fails, refused, pending = [], [], [], []
        for reward in p.rewards:
            e = board["table"][reward][m]
            if e.get("refused"):
                refused.append(f"{reward} ({e['refused'].split(';')[0]})")
            elif not e.get("seeds"):
                pending.append(reward)
            elif e["beats_base"]:
                cost = f"fidelity {e['fidelity_change_in_se']:+.1f}"
                if "tiny-rating_change_in_se" in e:
                    cost += f", tiny-rating {e['tiny-rating_change_in_se']:+.1f}"
                wins.append(f"{reward} ({e['gain_in_se']:+.1f}; {cost}"
                            + (f"; **hacking flag: {e['hacking']}**" if e["hacking"] else "") + ")")
            else:
                fails.append(f"{reward} ({e['gain_in_se']:+.1f}): {e.get('diagnosis', '')}")
        if not wins and not refused and not fails:
            done = ""
            if p.tuning:
                runs = [r for r in plan_tuning(p) if r.method == m]
                done = (f" (tuning: {sum(sweep.status_of(r.run_dir) == 'complete' for r in runs)} of {len(runs)} "
                        "configurations done)")
            lines.append(f"- **{m}**: not run yet{done}.")
            continue
        text = f"- **{m}** beats the base model on " + ("; ".join(wins) if wins else "no reward") + "."
        if p.budgets:
            flags = [rw for rw, per in board["budgets"]["overopt"].items() if per.get(m, {}).get("flag")]
            if flags:
                text += f" **Over-optimisation flag** (gold fell while the proxy rose) on {', '.join(flags)}."
        if fails:
            text += " No 3-SE gain on " + "; ".join(fails) + "."
        if refused:
            text += " Refused on " + "; ".join(refused) + "."
        if pending:
            text += " Not run yet on " + ", ".join(pending) + "."
        lines.append(text)
    return "\n".join(lines) + "\n"


def update_readme(path: str, p: Protocol, text: str) -> None:
    """Replace what stands between ``<!-- leaderboard NAME -->`` and ``<!-- /leaderboard NAME -->`` in ``path``."""
    start, end = f"<!-- leaderboard {p.name} -->", f"<!-- /leaderboard {p.name} -->"
    with open(path) as f:
        page = f.read()
    if start not in page or end not in page:
        raise BenchError(f"{path!r} has no '{start}' ... '{end}' markers; accepted: a file holding both")
    head, rest = page.split(start, 1)
    store.atomic_write_text(path, head + start + "\n" + text + rest[rest.index(end):])


def figure(p: Protocol, board: dict, stem: str) -> list[str]:
    """Gain in SE per method, a panel per reward, the sigma line drawn; a method not run or refused shows none."""
    from bench.outputs.plots import pyplot

    plt = pyplot()
    methods = list(p.methods)
    fig, axes = plt.subplots(1, len(p.rewards), figsize=(3.2 * len(p.rewards), 0.35 * len(methods) + 1.4),
                             sharey=True, squeeze=False)
    for ax, reward in zip(axes[0], p.rewards):
        rows = board["table"][reward]
        vals = [rows[m].get("gain_in_se", math.nan) if rows[m].get("seeds") else math.nan for m in methods]
        colours = ["tab:green" if v > p.sigma else "tab:red" if v < -p.sigma else "tab:gray" for v in vals]
        ax.barh(range(len(methods)), [0 if math.isnan(v) else v for v in vals], color=colours)
        for i, v in enumerate(vals):
            if math.isnan(v):
                ax.text(0, i, " refused" if rows[methods[i]].get("refused") else " not run", va="center", fontsize=7)
        ax.axvline(p.sigma, color="k", ls="--", lw=0.8)
        ax.axvline(0, color="k", lw=0.5)
        ax.set_title(reward, fontsize=9)
        ax.set_xlabel("gain over base (SE)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(methods)), methods)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{p.name}: gain in SE at {p.budget_images} training images", fontsize=9)
    fig.tight_layout()
    paths = budgets.save_figure(fig, stem, dpi=150)
    plt.close(fig)
    return paths


def write_outputs(p: Protocol) -> list[str]:
    """leaderboard.md, leaderboard.html, leaderboard.json (numbers), gains.png/.svg, from the runs complete so far."""
    board = build(p)
    log = _read_log(p)
    log["board"] = json.loads(json.dumps(board, default=float).replace("NaN", "null"))
    _write_log(p, log)
    md = os.path.join(p.root, "leaderboard.md")
    text = markdown(p, board, log)
    store.atomic_write_text(md, text)
    paths = [md, _log_path(p)]
    if board["runs_complete"]:
        paths += figure(p, board, os.path.join(p.root, "gains"))
    figures = []
    if p.budgets and board["runs_complete"]:
        figures += budgets.curves_figure(f"{p.name}: eval reward against cost at budgets {p.budgets}", p.rewards,
                                         board["budgets"]["curves"], os.path.join(p.root, "budget_curves"))[:1]
        figures += budgets.overopt_figure(f"{p.name}: proxy and gold against the KL to the base model",
                                          board["budgets"]["overopt"], p.gold, os.path.join(p.root, "overopt"))[:1]
        paths += figures
    store.atomic_write_text(os.path.join(p.root, "summary.md"), summary(p, board))
    paths.append(os.path.join(p.root, "summary.md"))
    page = os.path.join(p.root, "leaderboard.html")
    store.atomic_write_text(page, leaderboard_page.html_page(p, board, text,
                                                             paths[2] if board["runs_complete"] else None,
                                                             figures))
    return paths + [page]


def main(args) -> int:
    p = load_protocol(args.protocol or DEFAULT_PROTOCOL, args.root)
    if args.executor not in sweep.EXECUTORS:
        raise BenchError(f"executor {args.executor!r}; accepted: {', '.join(sweep.EXECUTORS)}")
    if not args.tables_only:
        run(p, executor=args.executor, address=args.address, cpus_per_run=args.cpus_per_run)
    for path in write_outputs(p):
        print(f"wrote {path}")
    if args.readme:
        with open(os.path.join(p.root, "summary.md")) as f:
            update_readme(args.readme, p, f.read())
        print(f"updated {args.readme}")
    board = build(p) if args.tables_only else None
    board = board or build(p)
    print(f"leaderboard {p.name}: {board['runs_complete']}/{board['runs_planned']} runs complete in "
          f"{p.root}", file=sys.stdout)
    return 0
