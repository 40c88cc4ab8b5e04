"""bench sweep --executor ray against a local Ray instance: the same run folders (config hashes, metrics) as the local
executor, and a Ray sweep whose driver is killed mid-way finishes the rest when rerun, without rerunning a finished
run.  Skipped only where the ray extra is not installed (make test installs it)."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from cli_capture import capture
from conftest import ROOT, VOLATILE, metrics_of

from bench.drivers import sweep
from diffalign.store import RunFolder

pytest.importorskip("ray")
pytestmark = pytest.mark.slow


def _args(pipe_dir, prompts):
    return [f"model={pipe_dir}", f"eval_prompts={prompts}", "steps=4", "checkpoint_every=2", "eval.every=2",
            "eval.grid_every=2", "eval.num_seeds=2", "eval.num_steps=2", "sampler.num_steps=2", "threads=1",
            "reward=saturation", "alignprop.batch_size=2", "alignprop.lr=0.05"]


def _folders(root):
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def test_ray_sweep_gives_the_local_executors_run_folders(small_pixel_pipeline_dir, tmp_path):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    base = ["sweep", "--methods", "alignprop", "--seeds", "0", "1", "--set", *_args(small_pixel_pipeline_dir, prompts)]
    local, ray_root = str(tmp_path / "local"), str(tmp_path / "ray")
    assert capture(base + ["--root", local])[0] == 0
    code, out = capture(base + ["--root", ray_root, "--executor", "ray", "--cpus-per-run", "1"])
    assert code == 0 and "sweep: 2/2 runs complete" in out, out
    assert _folders(local) == _folders(ray_root) and len(_folders(local)) == 2  # same names = same config hashes
    for d in _folders(local):
        a, b = (metrics_of(os.path.join(r, d)).drop(columns=VOLATILE) for r in (local, ray_root))
        pd.testing.assert_frame_equal(a, b)  # same code, same seed, same threads: the same numbers
        assert json.load(open(os.path.join(ray_root, d, "manifest.json")))["status"] == "complete"
    assert [r["status"] for r in json.load(open(os.path.join(ray_root, "sweep.json")))["runs"]] == ["complete"] * 2


def test_killed_ray_sweep_driver_reruns_only_what_is_left(small_pixel_pipeline_dir, tmp_path):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    root = str(tmp_path / "root")
    argv = ["sweep", "--methods", "alignprop", "--seeds", "0", "1", "2", "--root", root, "--executor", "ray",
            "--cpus-per-run", "2", "--set", *_args(small_pixel_pipeline_dir, prompts)]
    driver = subprocess.Popen([sys.executable, "-m", "bench", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    planned = sweep.plan(["alignprop"], [0, 1, 2], [], _args(small_pixel_pipeline_dir, prompts), root)
    deadline = time.time() + 240
    while time.time() < deadline and not any(sweep.status_of(p.run_dir) == "complete" for p in planned):
        time.sleep(0.5)
    driver.send_signal(signal.SIGKILL)  # the driver dies mid-sweep: Ray ends its tasks with it
    driver.wait()
    at_kill = [p.seed for p in planned if sweep.status_of(p.run_dir) == "complete"]
    assert at_kill and len(at_kill) < 3, at_kill
    deadline = time.time() + 20  # the killed driver's workers end with it and let go of their run folders
    while time.time() < deadline and any(RunFolder(p.run_dir).locked_by() for p in planned):
        time.sleep(0.2)
    assert not any(RunFolder(p.run_dir).locked_by() for p in planned)
    status = {p.seed: sweep.status_of(p.run_dir) for p in planned}
    assert [s for s, v in status.items() if v == "complete"] == at_kill, status  # nothing finished after the kill
    done_before = [p for p in planned if status[p.seed] == "complete"]
    mtimes = {p.seed: os.stat(os.path.join(p.run_dir, "metrics.parquet")).st_mtime_ns for p in done_before}
    code, out = capture(argv)
    assert code == 0 and "sweep: 3/3 runs complete" in out, out
    assert out.count("complete, skipped") == len(done_before), (status, out)
    assert out.count("interrupted, resuming") == list(status.values()).count("interrupted"), (status, out)
    for p in done_before:  # a finished run is not run again
        assert os.stat(os.path.join(p.run_dir, "metrics.parquet")).st_mtime_ns == mtimes[p.seed]
    for p in planned:
        assert metrics_of(p.run_dir)["step"].tolist() == [0, 1, 2, 3, 4]
