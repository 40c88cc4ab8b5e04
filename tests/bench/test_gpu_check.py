"""make gpu-check (bench/tools/gpu_check.py) in its CPU tiny mode, so the script cannot rot: every section measures
what it says, through the harness's own run objects; without a GPU the full check refuses with one line."""
import json

import pytest

from bench.tools import gpu_check
from diffalign.errors import BenchError


def test_tiny_mode_measures_every_section(tmp_path):
    assert gpu_check.main(["--tiny", "--out", str(tmp_path / "out"), "--cache", str(tmp_path / "cache")]) == 0
    r = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert r["mode"] == "tiny" and r["matmul"] is None
    rows = r["alignprop"]
    assert [a["batch"] for a in rows] == gpu_check.TINY["alignprop_batches"]
    for a in rows:
        assert a["variant"] == "alignprop/last_k(K=1)" and a["grad_steps"] == 1  # K = 1: one step keeps its gradient
        assert a["step_s"] > 0 and a["images_per_s"] == pytest.approx(a["batch"] / a["step_s"])
    d = r["ddpo"]
    assert d["variant"].startswith("ddpo-is/") and d["batch"] == gpu_check.TINY["ddpo_batch"]
    assert d["sampling_s"] > 0 and d["training_s"] > 0
    assert d["round_s"] == pytest.approx(d["sampling_s"] + d["training_s"])
    assert d["train_batch"] == d["batch"] // 2 and d["ratio_dev_first_max"] <= 1e-6  # float32 on the CPU
    # the tiny world: each method of the tiny mode in float32 and bf16, its first inner step's ratios at 1
    rows = {(t["method"], t["precision"]): t for t in r["tiny_world"]}
    assert set(rows) == {(m, p) for m in gpu_check.TINY_METHODS for p in gpu_check.PRECISIONS}
    for (m, p), t in rows.items():
        assert "error" not in t, t
        assert t["dtype"] == ("torch.bfloat16" if p == "bf16" else "torch.float32")
        assert t["step_s"] > 0 and t["ratio_dev_first"] <= 1e-6 and t["skipped_updates"] == 0
        assert all(v == v for v in t["eval_reward"])  # finite, not NaN
    u = r["unet"]
    # frozen weights: the backward takes input gradients (about one forward) and the small LoRA weight gradients
    assert 1.8 < u["flops"] / u["flops_forward"] < 3.1
    assert u["fraction_of_bf16_peak"] is None  # no GPU, no peak
    md = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| batch 1 |" in md and "UNet forward + backward" in md and "| ddpo | bf16 |" in md


def test_full_check_refuses_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(BenchError, match="needs a CUDA GPU and none is visible; accepted without one"):
        gpu_check.main(["--out", str(tmp_path)])


def test_bf16_peaks_by_device_name():
    assert gpu_check.bf16_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.bf16_peak("NVIDIA H200") == gpu_check.bf16_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_check.bf16_peak("some CPU") is None
