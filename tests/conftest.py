"""Shared fixtures.  The torchvision shim must run before anything imports transformers/peft."""
from bench import _compat

_compat.apply()

import os  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_UNET = dict(
    sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8,
)


@pytest.fixture(scope="session")
def small_pixel_pipeline_dir(tmp_path_factory):
    """A random-weight pixel-space pipeline (8x8 images) in the diffusers folder layout."""
    from bench import tiny_models

    comps = tiny_models.build_components(seed=0, unet_config=SMALL_UNET)
    path = str(tmp_path_factory.mktemp("pipe") / "small-pixel")
    tiny_models.save_pipeline(comps, path)
    return path


@pytest.fixture()
def small_pixel_pipeline(small_pixel_pipeline_dir):
    from bench.pipeline import load_pipeline

    return load_pipeline(small_pixel_pipeline_dir)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(2)


def run_killed_and_resumed(method: str, args: list[str], tmp_path) -> tuple[str, str]:
    """Run ``method`` once whole, and once in another process killed (SIGKILL) after step 3's update but
    before its checkpoint, then resumed; returns (whole run folder, killed-and-resumed run folder)."""
    import json
    import subprocess
    import sys

    import pandas as pd

    from bench import cli, harness
    from bench.config import resolve

    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    harness.start(resolve(method, args), full)
    env = dict(os.environ, **{harness.CRASH_ENV: "3"})
    cmd = [sys.executable, "-m", "bench", "run", "--method", method, "--out", killed] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert json.load(open(os.path.join(killed, "manifest.json")))["status"] == "running"
    assert pd.read_parquet(os.path.join(killed, "metrics.parquet"))["step"].max() == 2  # step 3 lost with the kill
    assert cli.main(["run", "--resume", killed]) == 0
    return full, killed
