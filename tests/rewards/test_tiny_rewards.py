"""The tiny world's own reward models (models/tiny-clip, tiny-aesthetic, tiny-count) and its hidden rating.

Held-out data come from seeds the training recipes never use (bench/tinyworld/train_rewards.py draws from
seeds 0, 10_000, 20_000, 30_000); the figures printed here are docs/rewards.md's."""
import json
import os

import numpy as np
import pytest
import torch

from bench.tinyworld.train_rewards import _scaled, correlations, degrade, renders
from diffalign import world
from diffalign.errors import BenchError
from rewards import get_reward
from rewards.tiny import model_dir

HELD_OUT = 777


@pytest.fixture(scope="module")
def clean():
    return renders(np.random.default_rng(HELD_OUT), 960, degraded=0.0)


@pytest.fixture(scope="module")
def degraded():
    x, scenes = renders(np.random.default_rng(HELD_OUT + 1), 600, degraded=1.0, scale=(0.5, 1.8))
    return x, scenes


# --- the hidden rating ---------------------------------------------------------------------------------

def test_rating_prefers_bigger_cleaner_vivid_centred():
    rng = np.random.default_rng(0)
    scene = world.Scene("red", "circle", 1, None, ((16.0, 16.0, 5.0),))
    base = world.render(scene).transpose(2, 0, 1)
    r = lambda im: float(world.aesthetic_rating(im)[0])  # noqa: E731
    small = world.render(_scaled(scene, 0.5)).transpose(2, 0, 1)
    off_centre = world.render(world.Scene("red", "circle", 1, None, ((7.0, 7.0, 5.0),))).transpose(2, 0, 1)
    noisy = np.clip(base + 0.1 * rng.standard_normal(base.shape), 0, 1)
    grey_bg = np.clip(base + 0.3 * (base.max(0, keepdims=True) < 0.05), 0, 1)
    dull = base + 0.5 * (base.mean(0, keepdims=True) - base)
    assert r(base) > 7.5
    for worse, by in ((small, 1.0), (off_centre, 0.5), (noisy, 2.0), (grey_bg, 2.0), (dull, 0.5)):
        assert r(worse) < r(base) - by
    assert r(np.zeros((3, 32, 32))) == pytest.approx(3.0 + 2.0)  # clean and smooth, nothing else
    bigger = world.render(_scaled(scene, 1.5)).transpose(2, 0, 1)
    assert r(bigger) > r(base)
    with pytest.raises(ValueError):
        world.aesthetic_rating(np.zeros((32, 32)))


def test_rating_spreads_over_renders(clean, degraded):
    rc = world.aesthetic_rating(clean[0].numpy())
    rd = world.aesthetic_rating(degraded[0].numpy())
    print(f"\nrating: clean renders {rc.mean():.2f} ± {rc.std():.2f}, degraded {rd.mean():.2f} ± {rd.std():.2f}")
    assert rc.std() > 0.4 and rd.std() > 1.2
    assert rc.mean() > rd.mean() + 1.5


# --- tiny-clip -------------------------------------------------------------------------------------------

def test_tiny_clip_retrieves_captions(clean):
    reward = get_reward("tiny-clip")
    assert reward.differentiable and reward.name == "tiny-clip"
    captions = world.all_captions()
    x, scenes = clean
    with torch.no_grad():
        sims = reward.image_embeds(x) @ reward.text_embeds(captions).T
    got = [captions[i] for i in sims.argmax(-1).tolist()]
    top1 = np.mean([g == s.caption for g, s in zip(got, scenes)])
    attrs = np.mean([world.parse_caption(g)["count"] == s.count and g.split()[1] == s.colour
                     and world.parse_caption(g)["shape"] == s.shape for g, s in zip(got, scenes)])
    print(f"\ntiny-clip top-1 over {len(captions)} captions: {top1:.3f} (chance {1 / len(captions):.3f}); "
          f"colour+shape+count right: {attrs:.3f}")
    assert top1 > 0.5 and attrs > 0.65
    # the score itself: the true caption beats a wrong one, and gradients reach the image
    img = x[:8].clone().requires_grad_(True)
    right = reward(img, [s.caption for s in scenes[:8]])
    wrong = reward(img.detach(), [world.caption("green" if s.colour != "green" else "red", s.shape, s.count)
                                  for s in scenes[:8]])
    assert right.shape == (8,) and (right > wrong).float().mean() >= 0.75
    right.sum().backward()
    assert img.grad.abs().sum() > 0


# --- tiny-aesthetic --------------------------------------------------------------------------------------

def test_tiny_aesthetic_predicts_the_hidden_rating(clean, degraded):
    reward = get_reward("tiny-aesthetic")
    assert reward.differentiable and reward.name == "tiny-aesthetic"
    out = {}
    for name, (x, _) in (("clean", clean), ("degraded", degraded)):
        with torch.no_grad():
            pred = reward(x, [""] * len(x)).numpy()
        out[name] = correlations(pred, world.aesthetic_rating(x.numpy()))
    both = correlations(np.concatenate([reward(x, [""] * len(x)).detach().numpy() for x in (clean[0], degraded[0])]),
                        np.concatenate([world.aesthetic_rating(x.numpy()) for x in (clean[0], degraded[0])]))
    print(f"\ntiny-aesthetic vs hidden rating: clean {out['clean']}, degraded {out['degraded']}, together {both}")
    assert both["pearson"] > 0.9 and out["degraded"]["pearson"] > 0.85 and out["clean"]["spearman"] > 0.5
    img = clean[0][:4].clone().requires_grad_(True)
    reward(img, [""] * 4).sum().backward()
    assert img.grad.abs().sum() > 0


def test_tiny_aesthetic_head_has_the_published_format():
    with open(os.path.join(model_dir("tiny-aesthetic"), "config.json")) as f:
        cfg = json.load(f)
    sd = torch.load(os.path.join(model_dir("tiny-aesthetic"), cfg["head"]), map_location="cpu", weights_only=True)
    assert list(sd) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    assert all(v.dtype == torch.float32 for v in sd.values()) and sd["layers.7.weight"].shape == (1, 16)
    assert cfg["clip"] == "../tiny-clip"


# --- tiny-count ------------------------------------------------------------------------------------------

def test_tiny_count_reads_counts_and_passes_gradients(clean, degraded):
    reward = get_reward("tiny-count")
    assert reward.differentiable and reward.name == "tiny-count"
    for name, (x, scenes) in (("clean", clean), ("degraded", degraded)):
        with torch.no_grad():
            c = reward.count(x)
        true = torch.tensor([float(s.count) for s in scenes])
        acc = (c.round() == true).float().mean().item()
        print(f"\ntiny-count on {name} renders: rounded accuracy {acc:.3f}, MAE {(c - true).abs().mean():.3f}")
        assert acc > (0.95 if name == "clean" else 0.7)
    assert reward.count(torch.zeros(2, 3, 32, 32)).abs().max() < 0.5
    x, scenes = clean
    img = x[:6].clone().requires_grad_(True)
    prompts = [s.caption for s in scenes[:6]]
    right = reward(img, prompts)
    wrong = reward(img.detach(), [world.caption(s.colour, s.shape, 4 if s.count < 3 else 1) for s in scenes[:6]])
    assert (right > -0.6).all() and right.mean() > -0.3 and (wrong < right - 1.0).all()
    right.sum().backward()
    assert img.grad.abs().sum() > 0
    with pytest.raises(BenchError, match="tiny-world"):
        reward(x[:1], ["a photo of a cat"])


def test_degrade_is_deterministic_and_in_range():
    x = torch.rand(16, 3, 32, 32)
    a, b = degrade(np.random.default_rng(3), x), degrade(np.random.default_rng(3), x)
    assert torch.equal(a, b) and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, x)
