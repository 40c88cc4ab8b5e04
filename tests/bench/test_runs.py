"""End to end through the CLI and the harness (bench/core/run.py): every artefact of a run folder, determinism, bad
input as one line, the model loader's offline refusal, and compare.  (Each method's kill-and-resume test is in its
own tests/methods/ file.)"""
import json
import os
import socket
import time

import pandas as pd
import pytest
import torch
from conftest import ROOT, VOLATILE, error_line, metrics_of
from conftest import small_run_args as common_run_args

from bench import cli
from bench.core import run
from bench.core.config import resolve
from diffalign.lora import add_lora, load_lora, lora_state_dict
from diffalign.pipeline import load_pipeline
from methods import METHODS


@pytest.fixture()
def small_run_args(small_pixel_pipeline_dir, tmp_path):
    return common_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "alignprop.batch_size=2", "alignprop.truncation=per_step", "alignprop.lr=0.01"]


@pytest.mark.slow
def test_run_writes_every_artefact_and_is_deterministic(small_run_args, tmp_path):
    a, b, c = (str(tmp_path / n) for n in ("a", "b", "c"))
    _, summary = run.start(resolve("alignprop", small_run_args), a)
    run.start(resolve("alignprop", small_run_args), b)
    run.start(resolve("alignprop", small_run_args + ["seed=1"]), c)
    for name in ("config.yaml", "manifest.json", "metrics.parquet", "metrics.csv", "reward_curve.png",
                 "checkpoint.pt", "summary.json", "lora/pytorch_lora_weights.safetensors",
                 "lora/adapter_config.json", "grids/step_000000.png", "grids/step_000002.png",
                 "grids/step_000004.png", "grids/start_vs_end.png"):
        assert os.path.isfile(os.path.join(a, name)), name
    assert not [f for f in os.listdir(a) if f.startswith((".tmp", ".old"))]
    manifest = json.load(open(os.path.join(a, "manifest.json")))
    assert manifest["status"] == "complete" and manifest["seed"] == 0 and manifest["device"] == "cpu"
    assert manifest["versions"]["torch"].startswith("2.13") and "commit" in manifest["git"]
    assert manifest["variant"] == "alignprop/per_step"
    df = metrics_of(a)
    assert df["step"].tolist() == [0, 1, 2, 3, 4]
    for col in ("reward_mean", "reward_std", "eval_reward_mean", "eval_reward_sem", "fidelity", "images",
                "unet_fwd", "unet_bwd", "wall_time", "peak_mem_mb"):
        assert col in df, col
    assert df["images"].tolist() == [0, 2, 4, 6, 8]
    assert df["eval_reward_mean"].notna().tolist() == [True, False, True, False, True]
    # same seed -> identical metrics; another seed -> different ones
    pd.testing.assert_frame_equal(df.drop(columns=VOLATILE), metrics_of(b).drop(columns=VOLATILE))
    assert not df["reward_mean"].iloc[1:].equals(metrics_of(c)["reward_mean"].iloc[1:])
    assert summary["eval_reward_after"] == pytest.approx(df["eval_reward_mean"].iloc[-1])
    assert summary["startup_s"] is None and summary["build_s"] > 0  # in a process that is not the run's own
    # the saved LoRA reloads into a fresh pipeline with exactly the trained weights
    pipe = load_pipeline(resolve("alignprop", small_run_args).model)
    add_lora(pipe.unet, seed=123)
    load_lora(pipe.unet, os.path.join(a, "lora"))
    trained = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=False)["lora"]
    reloaded = lora_state_dict(pipe.unet)
    assert trained.keys() == reloaded.keys()
    assert all(torch.equal(trained[k], reloaded[k]) for k in trained)


def test_bad_input_gives_one_clear_line_and_writes_nothing(capsys, tmp_path, small_pixel_pipeline_dir):
    out = str(tmp_path / "run")
    base = ["run", "--out", out, "--set", f"model={small_pixel_pipeline_dir}"]
    bad_index = tmp_path / "bad-index"
    bad_index.mkdir()
    (bad_index / "model_index.json").write_text("{not json")
    no_unet = tmp_path / "no-unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text("{}")
    cases = [
        (["run", "--method", "dpo"],
         "unknown method 'dpo'; accepted: " + ", ".join(sorted(METHODS))),
        (base + ["--method", "alignprop", "--reward", "beauty"], "unknown reward 'beauty'; accepted:"),
        (base + ["--method", "alignprop", "train_prompts=animals"], "unknown prompt set 'animals'; accepted:"),
        (base + ["--method", "alignprop", "--model", str(tmp_path / "nowhere")], "does not exist; accepted:"),
        (base + ["--method", "alignprop", "--model", str(bad_index)], "model_index.json is malformed"),
        (base + ["--method", "alignprop", "--model", str(no_unet)], "lacks unet/, text_encoder/"),
        (base + ["--method", "alignprop", "alignprop.lrr=1"], "unknown config key 'alignprop.lrr'; accepted:"),
        (base + ["--method", "alignprop", "steps=many"], "config key 'steps' = 'many'; accepted: an integer"),
        (base + ["--method", "alignprop", "oops"], "bad override 'oops'; accepted: KEY=VALUE"),
        (base + ["--method", "alignprop", "alignprop.truncation=last-k"], "accepted: full, per_step, last_k"),
        (base + ["--method", "alignprop", "--reward", "jpeg-compressibility"], "is not differentiable"),
        (["run", "--resume", str(tmp_path / "nothing")], "(no config.yaml); accepted: a run folder written by"),
        (base + ["--method", "ddpo", "sampler.eta=0"], "policy gradients need a stochastic sampler; accepted: eta > 0"),
        (base + ["--method", "ddpo-sf", "ddpo.estimator=is"], "method 'ddpo-sf' needs ddpo.estimator=sf"),
        (base + ["--method", "dpok", "dpok.baseline=critic"], "'dpok.baseline' = 'critic'; accepted: batch, value"),
        (base + ["--method", "ddpo", "ddpo.samples_per_step=10"], "must be a multiple of sample_batch_size"),
    ]
    for argv, expected in cases:
        line = error_line(capsys, argv)
        assert expected in line, (argv, line)
        assert not os.path.exists(out), argv


def test_hub_id_not_in_cache_fails_fast_without_network(capsys, tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    t0 = time.time()
    line = error_line(capsys, ["run", "--method", "alignprop", "--out", str(tmp_path / "r"),
                           "--model", "someorg/stable-diffusion-v1-5"])
    assert "neither a local folder nor in the Hugging Face cache" in line
    assert time.time() - t0 < 5


@pytest.mark.slow
def test_compare_plots_runs_and_rejects_unknown_metrics(small_run_args, tmp_path, capsys):
    a = str(tmp_path / "a")
    run.start(resolve("alignprop", small_run_args + ["steps=2"]), a)
    out = str(tmp_path / "cmp.png")
    assert cli.main(["compare", a, a, "--metric", "eval_reward_mean", "--metric", "kl_to_base", "--x", "images",
                     "--out", out]) == 0
    assert os.path.getsize(out) > 1000
    line = error_line(capsys, ["compare", a, "--metric", "nope", "--out", out])
    assert "metric 'nope' is in none of the runs" in line
    assert "x-axis 'epochs'; accepted: step" in error_line(capsys, ["compare", a, "--x", "epochs", "--out", out])


def test_a_process_knows_its_age():
    """run.process_age, the run's startup in summary.json when bench run is its own process: from the process's start
    (Linux's /proc), so the interpreter and the imports count."""
    import subprocess
    import sys

    code = "import time; t = time.time(); from bench.core.run import process_age; print(process_age(), time.time() - t)"
    age, imports = map(float, subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                             check=True).stdout.split())
    assert imports <= age + 0.02 < 60  # at least the imports it saw (10 ms ticks), not the machine's uptime
