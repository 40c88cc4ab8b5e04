"""`make peers`: our AlignProp and DDPO beside trl 0.23.1's AlignPropTrainer and DDPOTrainer, in one run.

Both sides train the same small random-weight latent Stable Diffusion folder (``bench.tools.perf.latent_pipeline``:
SD v1 scheduler, a VAE, the tiny world's text encoder) on the same prompts (tiny-train) with the same work per step,
on 1 thread, in alternating rounds (ours, then trl's, per method per round) so that drift of the machine hits both:

- AlignProp: batch 8, 10 DDIM steps at eta 0, CFG 3, gradients through the last K = 2 steps, LoRA rank 4 (alpha 4,
  gaussian init) on to_q/to_k/to_v/to_out.0, AdamW, clip 5, the saturation reward (written out on trl's side);
- DDPO: 16 samples per step (2 batches of 8), 10 DDIM steps at eta 1, CFG 3 in sampling and training, every step
  trained (timestep fraction 1), train batch 4 x 2 accumulation, 1 inner epoch, PPO-clip importance sampling,
  per-prompt advantages (buffer 16, min count 16), the same LoRA.

What differs in the work (stated in docs/peers.md): trl runs AlignProp's truncated steps under autograd with gradient
checkpointing and discards their gradient (ours runs them without autograd); trl writes no checkpoint in these steps
(save_freq beyond the run) while our step includes its amortised checkpoint and metrics row (``store`` in
``bench.tools.perf``'s breakdown, reported apart); loss scales and weight decay differ (no effect on time).
Ours is measured by ``bench.tools.perf --one`` (one process per measurement: its peak resident set is its own), trl's by
``parity/peers_trl.py`` in .peers-venv.  The same environment checks trl's DDIM step log-prob (``scheduler_step``,
mean reduction) against ours (``diffalign.ddim.ddim_step``) at eta 0.5 and 1, every step of a 10-step schedule.

    python parity/peers.py [--rounds 2] [--steps 3] [--out docs]      (make peers builds .peers-venv first)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from bench.tools.perf import latent_pipeline
from diffalign.ddim import ddim_step
from diffalign.pipeline import load_pipeline
from diffalign.store import PROJECT_ROOT, atomic_write_json, atomic_write_text
from prompts import load_prompts

PEER_PY = os.environ.get("PEERS_PY", os.path.join(PROJECT_ROOT, ".peers-venv", "bin", "python"))
LOGPROB_TOL = 1e-5  # trl computes the step in float32, ours in float64: log-probs of order 1 agree to float32 rounding
OURS = {
    "alignprop": ["sampler.num_steps=10", "sampler.eta=0.0", "sampler.guidance=3.0", "alignprop.batch_size=8",
                  "alignprop.truncation=last_k", "alignprop.k_dist=fixed", "alignprop.k=2", "alignprop.lr=0.001",
                  "alignprop.grad_clip=5.0"],
    "ddpo": ["sampler.num_steps=10", "sampler.eta=1.0", "sampler.guidance=3.0", "ddpo.estimator=is",
             "ddpo.samples_per_step=16", "ddpo.sample_batch_size=8", "ddpo.train_batch_size=4", "ddpo.grad_accum=2",
             "ddpo.inner_epochs=1", "ddpo.timestep_fraction=1.0", "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0",
             "ddpo.lr=0.003", "ddpo.per_prompt_stats=true", "ddpo.stat_buffer=16", "ddpo.stat_min_count=16"],
}


def ours(method: str, model: str, steps: int) -> dict:
    sets = [f"model={model}", "judge=null", "reward=saturation", "threads=1", *OURS[method]]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "bench.tools.perf", "--one", method, "--steps", str(steps),
                        "--set", *sets],
                       cwd=PROJECT_ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"peers: our {method} failed: {r.stderr.strip().splitlines()[-1:]}")
    m = json.loads(r.stdout.strip().splitlines()[-1])
    return {"step_s": m["step_s"], "step_without_store_s": m["step_s"] - m["parts_s"]["store"],
            "peak_rss_mb": m["peak_mem_mb"], "process_s": time.time() - t0, "parts_s": m["parts_s"]}


def peer(args: list[str]) -> dict:
    t0 = time.time()
    r = subprocess.run([PEER_PY, os.path.join(PROJECT_ROOT, "parity", "peers_trl.py"), *args], cwd=PROJECT_ROOT,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"peers: trl {args[0]} failed: {r.stderr.strip().splitlines()[-3:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = time.time() - t0
    if "step_s" in out:
        out["step_s"] = statistics.mean(out["step_s"])
    return out


def logprob_inputs(model: str, path: str) -> None:
    """Random latents, model outputs and next samples at every step of a 10-step schedule, with our log-probs."""
    pipe = load_pipeline(model)
    sched = pipe.scheduler
    sched.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    shape = (4, *pipe.latent_shape)
    cases = {}
    for eta in (0.5, 1.0):
        rows = []
        for t in sched.timesteps.tolist():
            x_t, out, z = (torch.randn(shape, generator=g) for _ in range(3))
            prev = ddim_step(sched, out, int(t), x_t, 10, eta, noise=z).prev  # a sample of the step, as in a chain
            ours_lp = ddim_step(sched, out, int(t), x_t, 10, eta, prev=prev).log_prob
            rows.append({"t": int(t), "x_t": x_t, "model_output": out, "prev": prev, "ours": ours_lp.double()})
        cases[str(eta)] = rows
    torch.save({"scheduler": dict(sched.config), "num_steps": 10, "cases": cases}, path)


def markdown(report: dict) -> str:
    lines = [f"# Peers: trl {report['trl']} beside DiffAlign ({report['date']}, {report['machine']}, 1 thread, "
             f"{report['rounds']} alternating rounds of {report['steps']} timed steps)", "",
             "| method | ours s/step (without store) | trl s/step | ratio | ours peak RSS MB | trl peak RSS MB "
             "| ratio | ours process s | trl process s |", "|---|---|---|---|---|---|---|---|---|"]
    for m, r in report["methods"].items():
        lines.append(f"| {m} | {r['ours_step_s']:.3f} ({r['ours_step_without_store_s']:.3f}) | {r['trl_step_s']:.3f} | "
                     f"{r['step_ratio']:.2f}x | {r['ours_peak_rss_mb']:.0f} | {r['trl_peak_rss_mb']:.0f} | "
                     f"{r['rss_ratio']:.2f}x | {r['ours_process_s']:.1f} | {r['trl_process_s']:.1f} |")
    lp = report["logprob_max_abs_diff"]
    lines += ["", "Medians over the rounds.  DDIM step log-prob, trl's `scheduler_step` against ours on the same "
              "inputs (every step of 10, batch 4): max |difference| " + ", ".join(f"{k} {v:.1e}" for k, v in lp.items())
              + f" (tolerance {LOGPROB_TOL:g}: trl's float32 against our float64).", "",
              "What differs in the work: see parity/peers.py's docstring.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default="docs")
    a = p.parse_args(argv)
    if not os.path.isfile(PEER_PY):
        raise SystemExit(f"peers: no peer environment at {PEER_PY}; accepted: make peers (builds .peers-venv)")
    t0 = time.time()
    model = latent_pipeline(os.path.join(PROJECT_ROOT, "results", "cache", "perf-latent-sd"))
    with tempfile.TemporaryDirectory(prefix="peers-") as tmp:
        prompts = os.path.join(tmp, "prompts.txt")
        with open(prompts, "w") as f:
            f.write("\n".join(load_prompts("tiny-train")) + "\n")
        inputs = os.path.join(tmp, "logprob.pt")
        logprob_inputs(model, inputs)
        lp = peer(["logprob", "--inputs", inputs])
        rounds: dict[str, list] = {m: [] for m in OURS}
        for i in range(a.rounds):
            for m in OURS:
                o = ours(m, model, a.steps)
                t = peer([m, "--model", model, "--prompts", prompts, "--steps", str(a.steps)])
                print(f"round {i + 1} {m}: ours {o['step_s']:.3f} s/step {o['peak_rss_mb']:.0f} MB, "
                      f"trl {t['step_s']:.3f} s/step {t['peak_rss_mb']:.0f} MB", flush=True)
                rounds[m].append((o, t))
    methods = {}
    for m, rs in rounds.items():
        med = lambda side, k: statistics.median(r[side][k] for r in rs)  # noqa: E731
        methods[m] = {"ours_step_s": med(0, "step_s"), "ours_step_without_store_s": med(0, "step_without_store_s"),
                      "trl_step_s": med(1, "step_s"), "ours_peak_rss_mb": med(0, "peak_rss_mb"),
                      "trl_peak_rss_mb": med(1, "peak_rss_mb"), "ours_process_s": med(0, "process_s"),
                      "trl_process_s": med(1, "process_s"), "rounds": [[o, t] for o, t in rs]}
        methods[m]["step_ratio"] = methods[m]["ours_step_s"] / methods[m]["trl_step_s"]
        methods[m]["rss_ratio"] = methods[m]["ours_peak_rss_mb"] / methods[m]["trl_peak_rss_mb"]
    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "trl": lp["trl"], "rounds": a.rounds, "steps": a.steps, "methods": methods,
              "logprob_max_abs_diff": lp["max_abs_diff"], "logprob_tolerance": LOGPROB_TOL,
              "ours_overrides": OURS, "seconds": time.time() - t0}
    os.makedirs(a.out, exist_ok=True)
    atomic_write_json(os.path.join(a.out, "peers.json"), report)
    atomic_write_text(os.path.join(a.out, "peers.md"), markdown(report))
    print(markdown(report))
    bad = {k: v for k, v in lp["max_abs_diff"].items() if not v <= LOGPROB_TOL}
    if bad:
        raise SystemExit(f"peers: trl's DDIM log-prob differs from ours by more than {LOGPROB_TOL:g}: {bad}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
