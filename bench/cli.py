"""Command line: ``python -m bench run|list|compare|sweep|table|report|regress|leaderboard``, one handler each; the
installed console script ``diffalign`` is the same CLI (``diffalign run --method alignprop --quick``).

    python -m bench run --method alignprop [--reward R] [--steps N] [--seed S] [--set KEY=VALUE ...]
    python -m bench run --method alignprop --quick  # a smoke run: 2 steps, the smallest evaluation, tagged quick
    python -m bench run --resume RUN_DIR
    python -m bench list
    python -m bench compare RUN_DIR ... --metric kl_to_base --x images --out kl.png
    python -m bench compare [RUNS...] [--method M ...] [--reward R] [--tag T] --out-dir DIR [--grid FILE]
    python -m bench sweep --methods alignprop ddpo --seeds 0 1 2 [--reward R] [--set K=V] [--root DIR] [--file F]
    python -m bench table [RUNS...] [--method M ...] --out STEM [--threshold T]   # STEM.md, .tex, .csv
    python -m bench report [RUNS...] [--method M ...] --out report.html
    python -m bench regress [--methods M ...] [--update [--seeds S ...] [--set K=V]]
    python -m bench leaderboard [--protocol FILE] [--executor local|ray] [--tables-only]
    python -m bench serve-reward --reward SPEC [--host 127.0.0.1] [--port 8765]   # docs/reward-server.md

RUNS are run folders or folders holding them (results/runs, a sweep folder; default results/runs).

Bad input ends with one line ``error: ...`` naming what is wrong and what is accepted (exit 2);
nothing is written before the whole run has been checked.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from bench.core import run
from bench.core.config import resolve
from bench.drivers import leaderboard, regress, sweep
from bench.outputs import table
from bench.outputs.compare import RunData, plot_curves, plot_metrics, select_runs, side_by_side, warn_mixed_rewards
from bench.outputs.report import write_report
from bench.tools import reward_server
from diffalign.errors import BenchError
from diffalign.store import RunFolder, safe_name
from methods import METHODS
from prompts import available as available_prompt_sets
from rewards import REGISTRY


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad-input error
        raise BenchError(message)


def build_parser() -> argparse.ArgumentParser:
    prog = "diffalign" if os.path.basename(sys.argv[0]) == "diffalign" else "python -m bench"  # as it was started
    p = _Parser(prog=prog, description="DiffAlign: align text-to-image diffusion models, side by side.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    r = sub.add_parser("run", help="run one method (or resume a run)")
    r.add_argument("--method", help="alignprop, ... (see 'bench list')")
    r.add_argument("--reward")
    r.add_argument("--steps", type=int)
    r.add_argument("--seed", type=int)
    r.add_argument("--model", help="diffusers folder or cached Hugging Face repo id")
    r.add_argument("--preset", help="YAML preset (default: bench/presets/<method>.yaml)")
    r.add_argument("--out", help="run folder (default: results/runs/<method>-<reward>-seed<S>-<time>)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, dotted keys, repeatable (e.g. alignprop.lr=3e-4)")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue a killed run from its last checkpoint")
    r.add_argument("--quick", action="store_true",
                   help="a smoke run: 2 steps, evaluated at the start and end only with 2 seeds and 1 KL seed, no FD, "
                        "tagged quick (your --steps/--set win)")
    r.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="more overrides")
    r.set_defaults(handler=_run)
    sub.add_parser("list", help="methods, rewards and prompt sets").set_defaults(handler=_list)
    c = sub.add_parser("compare", help="curves of several runs (a line per method, +/- 1 SE over seeds), grids")
    _selection(c)
    c.add_argument("--metric", action="append", help="metric column(s) (default eval_reward_mean)")
    c.add_argument("--x", default="step",
                   help="step | images | reward_queries | unet_passes | unet_fwd | unet_bwd | wall_time")
    c.add_argument("--out", help="one PNG or SVG file, every metric a panel")
    c.add_argument("--out-dir", help="one figure per metric, PNG and SVG, paper column width")
    c.add_argument("--grid", metavar="FILE", help="side-by-side sample grid (PNG): base model + a row per method")
    c.add_argument("--grid-step", type=int, help="step of the grid (default: each run's final step)")
    c.add_argument("--grid-seed", type=int, default=0, help="which eval seed's samples (index, default 0)")
    c.add_argument("--title", default="")
    c.set_defaults(handler=_compare)
    s = sub.add_parser("sweep", help="a grid of method x reward x seed into the store; skips finished runs")
    s.add_argument("--methods", nargs="+", help="methods (see 'bench list')")
    s.add_argument("--seeds", nargs="+", type=int, help="seeds (default 0)")
    s.add_argument("--reward", "--rewards", dest="rewards", nargs="+", help="reward(s) (default: each preset's)")
    s.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run (a method's own section applies to it only)")
    s.add_argument("--root", help="sweep folder (default results/sweeps/default)")
    s.add_argument("--file", help="sweep YAML: methods, seeds, rewards, set, root")
    s.add_argument("--executor", default="local", help="local (one run after another here) | ray (each run a Ray task)")
    s.add_argument("--address", help="ray: HOST:PORT of a running Ray head (default: a local instance)")
    s.add_argument("--cpus-per-run", type=float, default=2, help="ray: CPUs each run's task asks for (default 2)")
    s.set_defaults(handler=sweep.main)
    t = sub.add_parser("table", help="paper table: Markdown, LaTeX (booktabs) and CSV")
    _selection(t)
    t.add_argument("--out", required=True, metavar="STEM", help="writes STEM.md, STEM.tex, STEM.csv")
    t.add_argument("--threshold", type=float, help="eval reward to reach (default: halfway base -> best)")
    t.set_defaults(handler=_table)
    h = sub.add_parser("report", help="one self-contained HTML page: curves, table, grids, run configs")
    _selection(h)
    h.add_argument("--out", required=True, help="HTML file")
    h.add_argument("--metric", action="append", help="curves to show (default: eval reward + held-out metrics)")
    h.add_argument("--x", help="one x-axis for every curve (default: the eval reward against images, UNet passes "
                                "and step, the held-out metrics against images)")
    h.add_argument("--grid-step", type=int)
    h.add_argument("--threshold", type=float)
    h.add_argument("--title", default="DiffAlign report")
    h.set_defaults(handler=_report)
    g = sub.add_parser("regress", help="rerun short configs and check their curves against results/baselines/")
    g.add_argument("--methods", nargs="+", help="default: every method with a baseline (--update: every method)")
    g.add_argument("--update", action="store_true", help="record the baselines anew (commit what it writes)")
    g.add_argument("--seeds", nargs="+", type=int, help="check: default the baseline's first seed; update: 0 1 2")
    g.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="with --update: more overrides of the short config (stored in the baseline)")
    g.add_argument("--baselines", default=os.path.join("results", "baselines"))
    g.add_argument("--out", default=os.path.join("results", "regress"), help="where the plots go")
    g.set_defaults(handler=regress.main)
    b = sub.add_parser("leaderboard", help="run a declared protocol (every method x reward x seed), resumable, "
                                           "and write its tables and figures")
    b.add_argument("--protocol", help="protocol YAML (default bench/protocols/tiny-v1.yaml)")
    b.add_argument("--root", help="results folder (default: the protocol's root)")
    b.add_argument("--tables-only", action="store_true", help="only the tables and figures from the runs complete")
    b.add_argument("--readme", metavar="FILE", help="also put the summary into FILE between its leaderboard markers")
    b.add_argument("--executor", default="local", help="local (one run after another here) | ray (each run a Ray task)")
    b.add_argument("--address", help="ray: HOST:PORT of a running Ray head (default: a local instance)")
    b.add_argument("--cpus-per-run", type=float, default=1, help="ray: CPUs each run's task asks for (default 1)")
    b.set_defaults(handler=leaderboard.main)
    v = sub.add_parser("serve-reward", help="serve a reward over HTTP for runs started with --reward http://HOST:PORT")
    reward_server.add_arguments(v)
    v.set_defaults(handler=reward_server.main)
    return p


def _selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="*", metavar="RUNS", help="run folders or folders holding them (default results/runs)")
    p.add_argument("--method", nargs="+", action="extend", help="only these methods")
    p.add_argument("--reward", nargs="+", action="extend", help="only these rewards")
    p.add_argument("--tag", nargs="+", action="extend", help="only runs with these tags")


def _select(args, complete_only: bool) -> list[RunData]:
    return select_runs(args.runs, args.method, args.reward, args.tag, complete_only=complete_only)


def _say(line: str) -> None:
    """One line to stderr in a single write, so the lines of several processes sharing the stream (torchrun,
    accelerate) never land on one line (print writes the text and its newline separately)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args.command_line = argv is None  # python -m bench / the diffalign command (tests pass their argv)
        return args.handler(args)
    except BenchError as e:
        _say(f"error: {e}")
        return 2
    except run.Interrupted as e:
        _say(f"interrupted: {e}")
        return run.EXIT_INTERRUPTED
    except RuntimeError as e:  # a data-parallel run whose other processes are gone (gloo / NCCL)
        if run.launched_processes() == 1 or not run.is_collective_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        _say(f"error: process {os.environ.get('RANK', '?')} of {run.launched_processes()} lost the others ({first}); "
             "the run folder keeps its last checkpoint: resume it with the same number of processes "
             "(bench run --resume RUN_DIR)")
        return 1


# ---- one handler per subcommand ---------------------------------------------------------------------------

def _run(args) -> int:
    main_process = int(os.environ.get("RANK", "0") or 0) == 0
    run.PROCESS_IS_THE_RUN = args.command_line  # a process of its own: its startup is the run's
    if args.resume:
        if args.quick:
            raise BenchError("--quick sets up a new run; accepted: --resume RUN_DIR alone (a run resumes with the "
                             "config it started with)")
        complete = RunFolder(args.resume).status() == "complete"
        run_dir, summary = run.resume(args.resume)
        method = f"{RunFolder(run_dir).read_config().get('method', 'run')} "
        method += "(already complete: nothing to resume)" if complete else "(resumed)"
    else:
        if not args.method:
            raise BenchError("run needs --method (or --resume RUN_DIR); see 'python -m bench list'")
        overrides = list(args.overrides) + list(args.extra)
        for key in ("reward", "steps", "seed", "model"):
            if getattr(args, key) is not None:
                overrides.append(f"{key}={getattr(args, key)}")
        if args.quick:
            overrides, what = quick_overrides(args.method, overrides, args.preset)
            if main_process:
                _say(f"quick: a smoke run, not a measurement ({what}); its config.yaml holds these settings")
        cfg = resolve(args.method, overrides, args.preset)
        method = cfg.method
        run_dir, summary = run.start(cfg, args.out)
    if main_process:  # one summary line per run, from its main process
        print(summary_line(method, summary, run_dir))
    return 0


QUICK = ["steps=2", "eval.num_seeds=2", "eval.kl_seeds=1"]  # the smallest evaluation with every metric: an SE
# needs two seeds, the KL to base one; every eval prompt stays (the held-out metrics and fidelity are per prompt)


def quick_overrides(method: str, overrides: list[str], preset: str | None) -> tuple[list[str], str]:
    """``bench run --quick``: 2 steps, evaluated at the start and the end only (grids too), 2 eval seeds, 1 KL seed, no
    Frechet distance, tagged ``quick``; the user's own overrides win.  Returns the overrides and what they set."""
    first = resolve(method, QUICK + overrides, preset)  # the steps, metrics and tag after the user's overrides
    steps = first["steps"]
    quick = QUICK + [f"eval.every={steps}", f"eval.grid_every={steps}"]
    metrics = [m for m in first["eval"]["metrics"] if m != "fd"]
    if metrics != list(first["eval"]["metrics"]):
        quick.append(f"eval.metrics={json.dumps(metrics)}")
    tag = first["tag"] if "quick" in first["tag"].split("-") else "-".join(t for t in (first["tag"], "quick") if t)
    final = resolve(method, quick + overrides + [f"tag={json.dumps(tag)}"], preset)
    e = final["eval"]
    what = (f"steps={final['steps']}, eval.num_seeds={e['num_seeds']}, eval.kl_seeds={e['kl_seeds']}, "
            f"eval.every={e['every']}, eval.grid_every={e['grid_every']}, "
            f"{'FD' if 'fd' in e['metrics'] else 'no FD'}, tag={final['tag']}")
    return quick + overrides + [f"tag={json.dumps(tag)}"], what


def _list(args) -> int:
    print("methods:    ", ", ".join(sorted(METHODS)))
    print("rewards:    ", ", ".join(sorted(REGISTRY)))
    print("prompt sets:", ", ".join(available_prompt_sets()))
    return 0


def _compare(args) -> int:
    if not (args.out or args.out_dir or args.grid):
        raise BenchError("compare needs --out FILE (one figure), --out-dir DIR (a figure per metric) or --grid FILE")
    runs = _select(args, complete_only=False)
    warn_mixed_rewards(runs)  # several training rewards: one line, and a panel (figure) per reward
    metrics = args.metric or ["eval_reward_mean"]
    if args.out:
        plot_metrics(runs, metrics, args.x, args.out, args.title)
        print(f"wrote {args.out}")
    if args.out_dir:
        for path in plot_curves(runs, metrics, args.x, args.out_dir, args.title):
            print(f"wrote {path}")
    if args.grid:  # one grid per reward: FILE, or FILE's stem + __<reward>.png when there are several
        rewards = sorted({r.reward for r in runs})
        for reward in rewards:
            out = args.grid if len(rewards) == 1 else f"{os.path.splitext(args.grid)[0]}__{safe_name(reward)}.png"
            print(f"wrote {side_by_side([r for r in runs if r.reward == reward], out, args.grid_step, args.grid_seed)}")
    return 0


def _table(args) -> int:
    for path in table.write(_select(args, complete_only=True), args.out, args.threshold):
        print(f"wrote {path}")
    return 0


def _report(args) -> int:
    page = write_report(_select(args, complete_only=True), args.out, args.metric, args.x, args.grid_step,
                        args.threshold, args.title)
    print(f"wrote {page}")
    return 0


def summary_line(method: str, s: dict, run_dir: str) -> str:
    fid = ""
    if s.get("fidelity_before") is not None:
        fid = f", prompt fidelity {s['fidelity_before']:.2f} -> {s['fidelity_after']:.2f}"
    on = f" on {s['model']} (flow)" if s.get("model_process") == "flow" else ""
    line = (f"{method}{on}: eval reward {s['eval_reward_before']:.4f} -> {s['eval_reward_after']:.4f} "
            f"({s['eval_reward_gain_in_se']:+.1f} SE, paired {s.get('eval_reward_gain_in_paired_se', 0):+.1f} SE)"
            f"{fid}{_fd_text(s)}; {s['steps']} steps in {s['wall_time_s']:.0f} s; results in {run_dir}")
    if s.get("baseline"):
        b = s["baseline"]
        line += (f"\n  baseline {b['variant']}: eval reward -> {b['eval_reward_after']:.4f}{_fd_text(b)}; "
                 f"{b['steps']} steps in {b['wall_time_s']:.0f} s; table: {os.path.join(run_dir, 'fd_nfe.md')}")
    return line


def _fd_text(s: dict) -> str:
    """', FD at NFE 3/5/10/20 81.8/47.5/31.1/26.7 -> ...' from a summary's fd_nfe<N>_before/_after."""
    nfes = sorted(int(k[len("fd_nfe"):-len("_after")]) for k in s if k.startswith("fd_nfe") and k.endswith("_after"))
    if not nfes:
        return ""
    before = "/".join(f"{s[f'fd_nfe{n}_before']:.1f}" for n in nfes)
    after = "/".join(f"{s[f'fd_nfe{n}_after']:.1f}" for n in nfes)
    return f", FD at NFE {'/'.join(map(str, nfes))} {before} -> {after}"
