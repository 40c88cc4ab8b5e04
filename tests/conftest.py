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
