"""``python -m bench.tools.reward_throughput``: what serving a reward costs (docs/reward-server.md's figures).

1. Throughput: images per second of a reward scored in this process against the same reward behind
   ``diffalign serve-reward`` on the loopback address (one client, requests one after another, float32 images: what
   a run does), for each reward and batch size; each figure is the median of ``--repeats`` timed calls after one
   untimed call; the server runs with the same torch thread count as the in-process scoring.  Also through ``u8``
   images (a quarter of the bytes, scores quantised).
2. The serving library: the round trip of one batch through the FastAPI/uvicorn server against the same request
   handled by the standard library's ``ThreadingHTTPServer`` (the zero-dependency alternative), on a reward that
   costs next to nothing (``saturation``), so what is left is the library's and the wire format's own cost.
3. A run's cost (``--run``): ``bench run --method ddpo-sf`` (what ``make bench METHOD=ddpo-sf`` runs) with the reward
   in-process and against a server, their wall time, train time and the time waited on the reward; and whether the
   two runs' metrics agree.

Everything goes to ``--out`` (JSON, default docs/reward_server.json) and a Markdown table to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from diffalign.store import PROJECT_ROOT, atomic_write_json
from rewards import get_reward
from rewards.remote import RemoteReward


def start_server(reward: str, threads: int, stdlib: bool = False) -> tuple[subprocess.Popen, int, str]:
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    cmd = ([sys.executable, "-m", "bench.tools.reward_throughput", "--stdlib-server", reward, "--threads", str(threads)]
           if stdlib else [sys.executable, "-m", "bench", "serve-reward", "--reward", reward, "--port", "0",
                           "--threads", str(threads)])
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=log, stderr=subprocess.STDOUT)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        text = open(log.name).read()
        if "serving reward" in text:
            port = int(text.split("http://127.0.0.1:")[1].split()[0])
            return proc, port, log.name
        if proc.poll() is not None:
            raise RuntimeError(text[-2000:])
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start in 120 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def timed(fn, repeats: int) -> float:
    fn()  # untimed: first-call costs (allocations, lazy imports)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def batch(n: int, side: int = 64) -> tuple[torch.Tensor, list[str]]:
    x = torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(0))
    return x, ["two blue squares"] * n


def throughput(rewards: list[str], batches: list[int], repeats: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for name in rewards:
        local = get_reward(name)
        proc, port, _ = start_server(name, threads)
        try:
            remote = RemoteReward(f"http://127.0.0.1:{port}")
            remote.connect()
            small = RemoteReward(f"http://127.0.0.1:{port}", {"encoding": "u8"})
            for n in batches:
                x, p = batch(n)
                with torch.no_grad():
                    t_local = timed(lambda: local(x, p), repeats)
                t_remote = timed(lambda: remote(x, p), repeats)
                t_u8 = timed(lambda: small(x, p), repeats)
                rows.append({"reward": name, "batch": n, "in_process_img_s": n / t_local,
                             "server_img_s": n / t_remote, "overhead_ms": 1000 * (t_remote - t_local),
                             "server_u8_img_s": n / t_u8})
                print(f"{name} batch {n}: in-process {n / t_local:.0f} img/s, server {n / t_remote:.0f} img/s",
                      file=sys.stderr)
        finally:
            stop(proc)
    return rows


def libraries(n: int, repeats: int, threads: int) -> list[dict]:
    rows = []
    x, p = batch(n)
    for label, stdlib in (("fastapi+uvicorn", False), ("stdlib ThreadingHTTPServer", True)):
        proc, port, _ = start_server("saturation", threads, stdlib)
        try:
            remote = RemoteReward(f"http://127.0.0.1:{port}")
            remote.connect()
            t = timed(lambda: remote(x, p), repeats)
            rows.append({"library": label, "batch": n, "round_trip_ms": 1000 * t})
            print(f"{label}: {1000 * t:.1f} ms per batch of {n}", file=sys.stderr)
        finally:
            stop(proc)
    return rows


def run_cost(threads: int) -> dict:
    """``bench run --method ddpo-sf`` (its preset: reward saturation) in-process and against a server."""
    from bench.core.config import resolve

    reward = resolve("ddpo-sf")["reward"]
    out = {"method": "ddpo-sf", "reward": reward}
    with tempfile.TemporaryDirectory() as tmp:
        proc, port, _ = start_server(reward, threads)
        try:
            for label, extra in (("in_process", []), ("server", ["--reward", f"http://127.0.0.1:{port}"])):
                folder = os.path.join(tmp, label)
                t0 = time.monotonic()
                done = subprocess.run([sys.executable, "-m", "bench", "run", "--method", "ddpo-sf", "--out", folder,
                                       *extra], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=3600,
                                      env=dict(os.environ, DIFFALIGN_EVAL_CACHE=os.path.join(tmp, "cache")))
                if done.returncode:
                    raise RuntimeError(done.stderr[-2000:])
                summary = json.load(open(os.path.join(folder, "summary.json")))
                import pandas as pd

                m = pd.read_parquet(os.path.join(folder, "metrics.parquet"))
                out[label] = {"process_s": time.monotonic() - t0, "train_time_s": summary["train_time_s"],
                              "eval_time_s": summary["eval_time_s"],
                              "reward_wait_s": float(m["reward_wait_s"].iloc[-1]) if "reward_wait_s" in m else None,
                              "reward_requests": int(m["reward_requests"].iloc[-1]) if "reward_requests" in m
                              else None, "eval_reward_after": summary["eval_reward_after"]}
                print(f"ddpo-sf {label}: {out[label]}", file=sys.stderr)
            a = pd.read_parquet(os.path.join(tmp, "in_process", "metrics.parquet"))
            b = pd.read_parquet(os.path.join(tmp, "server", "metrics.parquet"))
            drop = ["wall_time", "peak_mem_mb", "reward_wait_s", "reward_requests", "reward_retries"]
            a, b = a.drop(columns=[c for c in drop if c in a]), b.drop(columns=[c for c in drop if c in b])
            out["same_metrics"] = bool(a.equals(b))
        finally:
            stop(proc)
    return out


def stdlib_server(reward_spec: str, threads: int) -> None:
    """The comparison server: the same request parsing and reply, on ``http.server`` (one thread per request, the
    reward called under a lock, no batching)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from bench.tools.reward_server import LIMITS, parse_request

    torch.set_num_threads(threads)
    reward, lock = get_reward(reward_spec), threading.Lock()
    limits = dict(LIMITS)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, payload: dict) -> None:
            body = json.dumps({"version": 1, **payload}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            self.send({"name": reward.name, "feedback": "scores", "encodings": ["f32", "u8", "png"]})

        def do_POST(self):
            images, prompts = parse_request(self.rfile.read(int(self.headers["Content-Length"])), limits)
            with lock, torch.no_grad():
                scores = reward(images, prompts)
            self.send({"scores": scores.float().tolist()})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    print(f"serving reward {reward_spec} on http://127.0.0.1:{server.server_address[1]}", file=sys.stderr, flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tools.reward_throughput", description=__doc__.splitlines()[0])
    p.add_argument("--rewards", nargs="+", default=["tiny-aesthetic", "tiny-clip"])
    p.add_argument("--batches", nargs="+", type=int, default=[8, 64])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the server alike")
    p.add_argument("--run", action="store_true", help="also time bench run --method ddpo-sf both ways (minutes)")
    p.add_argument("--out", default=os.path.join(PROJECT_ROOT, "docs", "reward_server.json"))
    p.add_argument("--stdlib-server", metavar="REWARD", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.stdlib_server:
        stdlib_server(args.stdlib_server, args.threads)
        return 0
    load = os.getloadavg()[0]
    result = {"conditions": {"host": platform.node(), "cpus": os.cpu_count(), "load_1min_at_start": load,
                             "threads": args.threads, "repeats": args.repeats, "image_side": 64,
                             "torch": torch.__version__, "device": "cpu", "encoding": "f32"},
              "throughput": throughput(args.rewards, args.batches, args.repeats, args.threads),
              "libraries": libraries(8, args.repeats, args.threads)}
    if args.run:
        result["run"] = run_cost(args.threads)
    result["conditions"]["load_1min_at_end"] = os.getloadavg()[0]
    atomic_write_json(args.out, result)
    print("| reward | batch | in-process img/s | server img/s (f32) | overhead ms/batch | server img/s (u8) |\n"
          "|---|---|---|---|---|---|")
    for r in result["throughput"]:
        print(f"| {r['reward']} | {r['batch']} | {r['in_process_img_s']:.0f} | {r['server_img_s']:.0f} | "
              f"{r['overhead_ms']:.1f} | {r['server_u8_img_s']:.0f} |")
    for r in result["libraries"]:
        print(f"{r['library']}: {r['round_trip_ms']:.1f} ms per batch of {r['batch']} (saturation)")
    if args.run:
        print(json.dumps(result["run"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
