"""The step-0 evaluation cache (bench/core/evalcache.py): a second run with the same base model and eval settings reuses
the first one's evaluation, and its numbers are the ones a fresh evaluation gives, bit for bit; a change of the
eval settings or of the eval's code is a different key."""
import json
import os

import pandas as pd
from conftest import small_run_args

from bench.core import evalcache, run
from bench.core.config import resolve

STEP0 = ["eval_reward_mean", "eval_reward_std", "eval_reward_sem", "win_rate", "fidelity", "kl_to_base",
         "eval_tiny-clip_mean", "eval_tiny-clip_sem"]


def _run(args, out):
    run.start(resolve("alignprop", args), out)
    rows = pd.read_parquet(os.path.join(out, "metrics.parquet"))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    return rows[rows["step"] == 0][STEP0].reset_index(drop=True), manifest["eval0"]


def test_a_second_run_reuses_the_step0_evaluation_bit_for_bit(small_pixel_pipeline_dir, tmp_path, monkeypatch):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + ["steps=2", "reward=saturation",
                                                                 "eval.metrics=[tiny-clip]"]
    monkeypatch.setenv(evalcache.CACHE_ENV, "0")
    fresh, source = _run(args, str(tmp_path / "fresh"))
    assert source == "computed"
    monkeypatch.setenv(evalcache.CACHE_ENV, str(tmp_path / "cache"))
    first, source = _run(args + ["seed=1", "alignprop.lr=0.01"], str(tmp_path / "first"))
    assert source == "computed" and len(os.listdir(tmp_path / "cache")) == 1
    second, source = _run(args + ["seed=2"], str(tmp_path / "second"))  # another seed and method setting
    assert source.startswith("cache ")
    pd.testing.assert_frame_equal(first, fresh, check_exact=True)
    pd.testing.assert_frame_equal(second, fresh, check_exact=True)
    grids = [open(os.path.join(tmp_path, d, "grids", "step_000000.png"), "rb").read() for d in ("fresh", "second")]
    assert grids[0] == grids[1]


def test_the_key_changes_with_the_eval_settings_and_the_code(small_pixel_pipeline_dir, tmp_path, monkeypatch):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path)
    k = evalcache.key(resolve("alignprop", args), small_pixel_pipeline_dir, "cpu")
    assert k == evalcache.key(resolve("alignprop", args + ["seed=5", "alignprop.lr=0.1"]), small_pixel_pipeline_dir,
                              "cpu")  # nothing of the method or the seed
    assert k == evalcache.key(resolve("alignprop", args + ["eval.every=7", "eval.grid_every=3"]),
                              small_pixel_pipeline_dir, "cpu")  # nor when the run evaluates
    assert k != evalcache.key(resolve("alignprop", args + ["eval.num_seeds=3"]), small_pixel_pipeline_dir, "cpu")
    assert k != evalcache.key(resolve("alignprop", args + ["reward=tiny-clip"]), small_pixel_pipeline_dir, "cpu")
    assert k != evalcache.key(resolve("alignprop", args), small_pixel_pipeline_dir, "cuda")
    code = tmp_path / "evaluate_copy.py"
    code.write_text("# a changed evaluation\n")
    monkeypatch.setattr(evalcache, "CODE", evalcache.CODE + [os.path.relpath(code, evalcache.PROJECT_ROOT)])
    assert k != evalcache.key(resolve("alignprop", args), small_pixel_pipeline_dir, "cpu")
