"""bench.tools.pg_diagnostics: the per-step noise scales and likelihood-ratio norms behind the DDPO/DPOK step skip."""
import json
import math

import pytest

from bench.tools import pg_diagnostics
from diffalign.ddim import set_timesteps, step_std
from diffalign.pipeline import load_pipeline


def test_pg_diagnostics_reports_every_step(small_pixel_pipeline_dir, tmp_path):
    out = tmp_path / "diag.json"
    pg_diagnostics.main(["--model", small_pixel_pipeline_dir, "--reward", "saturation", "--samples", "3",
                         "--pathwise", "16", "--steps", "3", "--out", str(out)])
    result = json.loads(out.read_text())
    pipe = load_pipeline(small_pixel_pipeline_dir)
    timesteps = set_timesteps(pipe.scheduler, 3)
    assert [r["timestep"] for r in result["per_step"]] == [int(t) for t in timesteps]
    for r, t in zip(result["per_step"], timesteps):
        assert r["sigma"] == pytest.approx(float(step_std(pipe.scheduler, int(t), 3, 1.0)), rel=1e-5)
        assert r["grad_norm"] > 0 and math.isfinite(r["along_mean"]) and r["along_se"] >= 0
    assert -1 <= result["pathwise_halves_cosine"] <= 1 and set(result["sums"]) == {"all", "all_but_last", "interior"}


def test_pg_diagnostics_refuses_a_non_differentiable_reward(small_pixel_pipeline_dir):
    with pytest.raises(SystemExit, match="not differentiable"):
        pg_diagnostics.main(["--model", small_pixel_pipeline_dir, "--reward", "jpeg-compressibility"])
