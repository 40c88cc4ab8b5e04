"""Sample quality against NFE (bench/core/fd.py): the tiny world's feature space behaves as a distance to real
images should, and the Inception features load only from a local file in torch-fidelity's format."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bench.core.fd import InceptionFeatures, TinyClipFeatures, features_of, real_images
from diffalign import frechet, world
from diffalign.errors import BenchError
from prompts import load_prompts


@pytest.fixture(scope="module")
def tiny():
    prompts = load_prompts("tiny-eval")
    extract = TinyClipFeatures()
    real = frechet.Stats.of(features_of(extract, real_images("tiny-world", prompts, 64, 32)))
    rng = np.random.default_rng(123)  # other renders of the same captions than the reference set's
    other = np.stack([world.render(world.scene_from_caption(p, rng), rng) for p in prompts for _ in range(8)])
    return extract, real, torch.from_numpy(other.transpose(0, 3, 1, 2).copy()).float()


def _fd(extract, real, images) -> float:
    return frechet.frechet_distance(frechet.Stats.of(features_of(extract, images)), real)


def test_real_against_real_is_near_zero_and_noise_and_blur_raise_the_distance_monotonically(tiny):
    extract, real, x = tiny
    clean = _fd(extract, real, x)
    g = torch.Generator().manual_seed(0)
    noisy = [_fd(extract, real, (x + s * torch.randn(x.shape, generator=g)).clamp(0, 1)) for s in (0.05, 0.1, 0.2, 0.4)]
    blurred = []
    for k in (1, 2, 3, 4):
        w = torch.ones(3, 1, 2 * k + 1, 2 * k + 1) / (2 * k + 1) ** 2
        blurred.append(_fd(extract, real, F.conv2d(F.pad(x, (k, k, k, k), mode="replicate"), w, groups=3)))
    # measured: real vs real 1.3 (64 renders against 512; the base model's samples are at 26-82); noise 3.6 ... 132
    assert clean < 2.0
    assert all(a < b for a, b in zip([clean] + noisy, noisy)), noisy
    assert all(a < b for a, b in zip([clean] + blurred, blurred)), blurred
    assert noisy[-1] > 50 * clean and blurred[-1] > 10 * clean


def test_inception_features_load_from_a_local_file_in_torch_fidelitys_format(tmp_path, monkeypatch):
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    monkeypatch.delenv("DIFFALIGN_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(BenchError, match="no weights file was given; accepted: a local copy of torch-fidelity's"):
        InceptionFeatures(None)
    with pytest.raises(BenchError, match="does not exist"):
        InceptionFeatures(str(tmp_path / "missing.pth"))
    # a file in the published format: the state dict of torch-fidelity's network (random weights here)
    monkeypatch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
    torch.manual_seed(0)
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                         feature_extractor_weights_path=_dummy(tmp_path))
    monkeypatch.undo()
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    feats = InceptionFeatures(str(path))
    out = feats(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    torch.save({"not": torch.zeros(1)}, tmp_path / "foreign.pth")
    with pytest.raises(BenchError, match="cannot be loaded"):
        InceptionFeatures(str(tmp_path / "foreign.pth"))


def _dummy(tmp_path) -> str:
    path = tmp_path / "empty.pth"
    torch.save({}, path)
    return str(path)
