"""Atomic writes: a failed or killed writer never leaves a half-written file in place."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from bench import store


def _listing(d):
    return sorted(os.listdir(d))


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "metrics.csv"
    store.atomic_write_text(str(target), "old\n")

    def broken_writer(buf):
        buf.write(b"new partial")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        store.atomic_write_with(str(target), broken_writer)
    assert target.read_text() == "old\n"
    assert _listing(tmp_path) == ["metrics.csv"]


def test_failure_during_the_file_write_cleans_up(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    store.atomic_write_json(str(target), {"v": 1})

    def no_space(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(OSError):
        store.atomic_write_json(str(target), {"v": 2})
    monkeypatch.undo()
    assert target.read_text().strip().startswith("{") and '"v": 1' in target.read_text()
    assert _listing(tmp_path) == ["a.json"]


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "lora"
    with store.atomic_dir(str(target)) as d:
        open(os.path.join(d, "w.bin"), "wb").write(b"1")
    with pytest.raises(ValueError):
        with store.atomic_dir(str(target)) as d:
            open(os.path.join(d, "w.bin"), "wb").write(b"2")
            raise ValueError("killed mid-save")
    assert (target / "w.bin").read_bytes() == b"1"
    with store.atomic_dir(str(target)) as d:
        open(os.path.join(d, "other.bin"), "wb").write(b"3")
    assert _listing(target) == ["other.bin"]  # replaced whole, old files gone
    assert _listing(tmp_path) == ["lora"]


def test_table_is_written_as_parquet_and_csv(tmp_path):
    df = pd.DataFrame({"step": [0, 1], "reward_mean": [0.5, float("nan")]})
    store.write_table(df, str(tmp_path / "metrics"))
    back = pd.read_parquet(tmp_path / "metrics.parquet")
    pd.testing.assert_frame_equal(back, df)
    assert pd.read_csv(tmp_path / "metrics.csv")["step"].tolist() == [0, 1]


WRITER = r"""
import sys
from bench import store
path = sys.argv[1]
i = 0
while True:
    i += 1
    store.atomic_write_bytes(path, (b"%08d" % i) * 500_000)   # 4 MB, every byte derived from i
"""


def test_killed_writer_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "big.bin"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for delay in (0.35, 0.6, 0.85):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=root)
        deadline = time.time() + 30
        while not target.exists() and time.time() < deadline:
            time.sleep(0.02)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == 4_000_000 and data == data[:8] * 500_000, "torn file"
