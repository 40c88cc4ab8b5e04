"""Command line: ``python -m bench run|list``.

    python -m bench run --method alignprop [--reward R] [--steps N] [--seed S] [--set KEY=VALUE ...]
    python -m bench run --resume RUN_DIR
    python -m bench list
    python -m bench compare RUN_DIR ... --metric kl_to_base --x images --out kl.png

Bad input ends with one line ``error: ...`` naming what is wrong and what is accepted (exit 2);
nothing is written before the whole run has been checked.
"""
from __future__ import annotations

import argparse
import sys

from bench.errors import BenchError


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other bad-input error
        raise BenchError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="DiffAlign: align text-to-image diffusion models, side by side.")
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
    r.add_argument("extra", nargs="*", metavar="KEY=VALUE", help="more overrides")
    sub.add_parser("list", help="methods, rewards and prompt sets")
    c = sub.add_parser("compare", help="curves of several runs on one figure")
    c.add_argument("runs", nargs="+", metavar="RUN_DIR")
    c.add_argument("--metric", action="append", help="metric column(s) (default eval_reward_mean)")
    c.add_argument("--x", default="step", help="step | images | reward_queries | unet_fwd | unet_bwd | wall_time")
    c.add_argument("--out", required=True, help="PNG or SVG file")
    c.add_argument("--title", default="")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.cmd == "list":
            from methods import METHODS
            from prompts import available
            from rewards import REGISTRY

            print("methods:    ", ", ".join(sorted(METHODS)))
            print("rewards:    ", ", ".join(sorted(REGISTRY)))
            print("prompt sets:", ", ".join(available()))
            return 0
        if args.cmd == "compare":
            from bench.compare import plot_metrics

            plot_metrics(args.runs, args.metric or ["eval_reward_mean"], args.x, args.out, args.title)
            print(f"wrote {args.out}")
            return 0
        from bench import harness

        if args.resume:
            run_dir, summary = harness.resume(args.resume)
            method = "resumed run"
        else:
            if not args.method:
                raise BenchError("run needs --method (or --resume RUN_DIR); see 'python -m bench list'")
            from bench.config import resolve

            overrides = list(args.overrides) + list(args.extra)
            for key in ("reward", "steps", "seed", "model"):
                if getattr(args, key) is not None:
                    overrides.append(f"{key}={getattr(args, key)}")
            cfg = resolve(args.method, overrides, args.preset)
            method = cfg.method
            run_dir, summary = harness.start(cfg, args.out)
        print(summary_line(method, summary, run_dir))
        return 0
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def summary_line(method: str, s: dict, run_dir: str) -> str:
    fid = ""
    if s.get("fidelity_before") is not None:
        fid = f", prompt fidelity {s['fidelity_before']:.2f} -> {s['fidelity_after']:.2f}"
    return (f"{method}: eval reward {s['eval_reward_before']:.4f} -> {s['eval_reward_after']:.4f} "
            f"({s['eval_reward_gain_in_se']:+.1f} SE){fid}; {s['steps']} steps in {s['wall_time_s']:.0f} s; "
            f"results in {run_dir}")
