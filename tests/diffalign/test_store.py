"""Atomic writes: a failed or killed writer never leaves a half-written file in place."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
from conftest import ROOT

from diffalign import store


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
from diffalign import store
path = sys.argv[1]
i = 0
while True:
    i += 1
    store.atomic_write_bytes(path, (b"%08d" % i) * 500_000)   # 4 MB, every byte derived from i
    if i == 1:
        print("writing", flush=True)
"""


def test_killed_writer_never_leaves_a_torn_file(tmp_path):
    target = tmp_path / "big.bin"
    for delay in (0.35, 0.6, 0.85):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], cwd=ROOT, stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout.readline().strip() == "writing"  # past its imports and first write: now kill it mid-loop
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = target.read_bytes()
        assert len(data) == 4_000_000 and data == data[:8] * 500_000, "torn file"


def test_run_folder_owns_every_file_of_a_run(tmp_path):
    folder = store.RunFolder(str(tmp_path / "run"))
    assert folder.status() == "new" and not folder.is_run() and folder.read_manifest() == {}
    folder.write_config({"method": "alignprop", "sampler": {"num_steps": 10}, "variant": "alignprop/full"})
    folder.update_manifest(status="running", seed=0)
    folder.update_manifest(resumes=[{"from_step": 2}])  # merged into what is there
    assert folder.status() == "interrupted" and folder.read_manifest() == {"status": "running", "seed": 0,
                                                                          "resumes": [{"from_step": 2}]}
    df = pd.DataFrame({"step": [0, 1], "eval_reward_mean": [0.5, float("nan")]})
    folder.write_metrics(df)
    assert folder.is_run() and folder.read_config()["sampler"] == {"num_steps": 10}
    pd.testing.assert_frame_equal(folder.read_metrics(), df)
    assert os.path.isfile(folder.file("metrics.csv"))
    folder.write_checkpoint({"step": 1, "rows": [{"step": 0}]})
    assert folder.read_checkpoint()["rows"] == [{"step": 0}]
    for step in (0, 10, 2):
        store.atomic_write_bytes(folder.grid_path(step), b"png")
    store.atomic_write_bytes(folder.start_vs_end_path, b"png")
    assert folder.grid_steps() == [0, 2, 10] and folder.read_summary() is None
    folder.write_summary({"steps": 1})
    folder.update_manifest(status="complete")
    assert folder.status() == "complete" and folder.read_summary() == {"steps": 1}
    assert sorted(os.listdir(folder.path)) == ["checkpoint.pt", "config.yaml", "grids", "manifest.json", "metrics.csv",
                                               "metrics.parquet", "summary.json"]


def test_safe_name_and_project_paths(tmp_path, monkeypatch):
    assert store.safe_name("alignprop-hpsv2:1.0,aesthetic:0.5 seed0") == "alignprop-hpsv2_1.0_aesthetic_0.5_seed0"
    monkeypatch.chdir(tmp_path)  # the committed tiny world is found from any working directory
    assert store.project_path("models/tiny-t2i") == os.path.join(ROOT, "models", "tiny-t2i")
    (tmp_path / "models").mkdir()
    assert store.project_path("models") == "models"  # what exists from here wins
