"""The optional trackers (bench/core/trackers.py): packages checked before a run, finite numbers mirrored."""
import math

import pytest

from bench.core import trackers
from diffalign.errors import BenchError


class FakeTracker:
    def __init__(self, log):
        self.calls = log

    def start(self):
        self.calls.append(("start",))

    def store_init_configuration(self, values):
        self.calls.append(("config", values))

    def log(self, values, step):
        self.calls.append(("log", values, step))

    def finish(self):
        self.calls.append(("finish",))


def test_trackers_check_packages_and_mirror_finite_numbers(monkeypatch, tmp_path):
    with pytest.raises(BenchError, match="unknown tracker 'mlflow'; accepted: tensorboard, wandb"):
        trackers.Trackers(["mlflow"], str(tmp_path))
    for name, package in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if not trackers._installed(*trackers.BACKENDS[name][0]):
            with pytest.raises(BenchError, match=f"tracker '{name}' needs the '{package}' package"):
                trackers.Trackers([name], str(tmp_path))
    calls = []
    monkeypatch.setitem(trackers.BACKENDS, "tensorboard", (("json",), "", lambda run_dir: FakeTracker(calls)))
    t = trackers.Trackers(["tensorboard"], str(tmp_path), config={"method": "alignprop", "eval": {"every": 10}})
    assert calls == []  # nothing starts before the first row
    t.log({"step": 3, "reward_mean": 0.5, "images": 24, "eval_reward_mean": math.nan, "variant": "x", "ok": True}, 3)
    t.close()
    assert calls == [("start",), ("config", {"method": "alignprop", "eval.every": 10}),
                     ("log", {"reward_mean": 0.5, "images": 24.0}, 3), ("finish",)]
    trackers.Trackers([], str(tmp_path)).log({"a": 1.0}, 1)  # none asked: a no-op


def test_tensorboard_tracker_writes_scalars_when_installed(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is an optional extra (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    t = trackers.Trackers(["tensorboard"], str(tmp_path), config={"method": "alignprop"})
    for step in range(3):
        t.log({"step": step, "reward_mean": 0.1 * step, "eval_reward_mean": math.nan if step == 1 else 0.2}, step)
    t.close()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [(e.step, round(e.value, 3)) for e in ea.Scalars("reward_mean")] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert [e.step for e in ea.Scalars("eval_reward_mean")] == [0, 2]
