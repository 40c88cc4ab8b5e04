import io

import numpy as np
import pytest
import torch
from PIL import Image

from bench.errors import BenchError
from rewards import get_reward


def _ddpo_jpeg_kb(images):
    """DDPO's definition written independently: uint8, PIL JPEG quality 95, bytes / 1000."""
    out = []
    for im in images:
        arr = (im.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        out.append(len(buf.getvalue()) / 1000)
    return torch.tensor(out)


def test_jpeg_rewards_follow_ddpo_definition():
    g = torch.Generator().manual_seed(0)
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand((1, 3, 64, 64), generator=g)
    images = torch.cat([flat, noise])
    comp = get_reward("jpeg-compressibility")
    incomp = get_reward("jpeg-incompressibility")
    sizes = _ddpo_jpeg_kb(images)
    assert torch.allclose(comp(images, ["", ""]), -sizes)
    assert torch.allclose(incomp(images, ["", ""]), sizes)
    assert sizes[1] > 5 * sizes[0]  # noise is much larger than a flat image
    # kB are bytes / 1000, not / 1024
    buf = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buf, format="JPEG", quality=95)
    assert float(incomp(flat, [""])) == pytest.approx(buf.tell() / 1000)
    assert not comp.differentiable and not incomp.differentiable


def test_saturation_values_and_gradient():
    r = get_reward("saturation")
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1
    grey = torch.full((1, 3, 8, 8), 0.4)
    assert float(r(red, [""])) == pytest.approx(1.0)
    assert float(r(grey, [""])) == pytest.approx(0.0)
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    r(x, ["", ""]).sum().backward()
    assert r.differentiable and x.grad.abs().sum() > 0


def test_unknown_reward_names_what_is_accepted():
    with pytest.raises(BenchError, match="unknown reward 'aesthetics'.*accepted: aesthetic, .*jpeg-compressibility.*package.module:Class"):
        get_reward("aesthetics")
