"""The published CLIP-family rewards (aesthetic, hpsv2, hpsv2.1, pickscore, clipscore) load their
published file formats, score correctly, pass gradients to the image, and fail fast and offline
when weights are missing.

The real models are too big for CI, so each test builds a random-weight model of the smallest
configuration of the same family (transformers ``CLIPModel``: ViT patch 14 at 224 px, 1 layer;
open_clip: ViT-H-14's config shrunk to width 32, 1 layer), saves it in the published container
(HPS: ``torch.save({'state_dict': ...})``; PickScore / CLIP: ``save_pretrained`` folders; the aesthetic
head: a float32 ``OrderedDict`` with keys ``layers.{0,2,4,6,7}.*``), loads it through the suite's
loader with strict key matching, and compares with a computation straight from the model built here
(its own ``forward``, torchvision's ``Resize`` + ``Normalize`` as AlignProp applies them).  The real
aesthetic head from ``../shared/weights`` is checked when present.
"""
import argparse
import collections
import json
import math
import os
import socket
import time

import pytest
import torch
from conftest import ROOT
from safetensors.torch import load_file, save_file

from diffalign.errors import BenchError
from rewards import clip_common, get_reward, weights
from rewards.aesthetic import LaionAesthetic, load_aesthetic, load_head
from rewards.clipscore import ClipScore
from rewards.hps import HPSv2, HPSv21, OpenClipScore
from rewards.pickscore import PickScore

REAL_HEAD = os.path.join(ROOT, "..", "shared", "weights", "laion-aesthetic-v2", "sac+logos+ava1-l14-linearMSE.pth")
PROMPTS = ["two red circles", "a blue square on the left", "three green triangles"]
# ViT-H-14's open_clip config with every width and depth shrunk (same family: patch 14 at 224 px,
# CLIP BPE vocabulary, context 77)
TINY_H14 = {"embed_dim": 16,
            "vision_cfg": {"image_size": 224, "layers": 1, "width": 32, "head_width": 16, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


# --- builders ----------------------------------------------------------------------------------------

def _write_clip_tokenizer(folder):
    """A CLIP BPE tokenizer with a character-level vocabulary (no merges), written offline."""
    from transformers import CLIPTokenizer

    chars = [chr(i) for i in range(33, 127)]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    tok.save_pretrained(folder)
    return tok


def _hf_clip(folder, *, projection_dim=16, seed=0, tokenizer=True):
    """A random-weight transformers CLIPModel saved with save_pretrained (+ its tokenizer)."""
    from transformers import CLIPConfig, CLIPModel

    vocab_size = 2 * 94 + 2
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=14),
        projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer:
        _write_clip_tokenizer(folder)
    return model


def _open_clip_model(cfg=TINY_H14, seed=0):
    torch.manual_seed(seed)
    return clip_common._open_clip_class(cfg).eval()


def _aesthetic_head_state(in_features, seed=0):
    """A state dict in the published head's format: OrderedDict, float32, layers.{0,2,4,6,7}."""
    torch.manual_seed(seed)
    sd = collections.OrderedDict()
    for i, (o, n) in zip((0, 2, 4, 6, 7), ((1024, in_features), (128, 1024), (64, 128), (16, 64), (1, 16))):
        sd[f"layers.{i}.weight"] = torch.randn(o, n) / n ** 0.5
        sd[f"layers.{i}.bias"] = torch.randn(o) * 0.1
    return sd


def _head_by_hand(sd, e):
    for i in (0, 2, 4, 6, 7):
        e = e @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return e.squeeze(-1)


def _alignprop_pixels(images, size=224):
    """AlignProp's differentiable preprocessing, with torchvision itself."""
    import torchvision.transforms as T

    return T.Normalize(clip_common.CLIP_MEAN, clip_common.CLIP_STD)(T.Resize(size, antialias=True)(images))


def _images(n=3, size=32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.interpolate(torch.rand(n, 3, 8, 8, generator=g), size=(size, size), mode="bilinear")
    return x.clamp(0, 1).requires_grad_(requires_grad)


def _assert_frozen_and_grad(reward, images, prompts):
    params = list(reward.backbone.parameters())
    assert params and all(not p.requires_grad for p in params) and not reward.backbone.model.training
    x = images.detach().clone().requires_grad_(True)
    reward(x, prompts).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("clip") / "tiny-clip-vit-14")
    return folder, _hf_clip(folder)


@pytest.fixture(scope="module")
def open_clip_folder(tmp_path_factory):
    """A tiny open_clip model in the Hugging Face open_clip layout, tiny-clip style: 32 px input,
    its own mean/std in preprocess_cfg."""
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    pre = {"size": 32, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bicubic",
           "resize_mode": "shortest"}
    folder = tmp_path_factory.mktemp("oc") / "tiny-open-clip"
    folder.mkdir()
    model = _open_clip_model(cfg)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return str(folder), model, cfg, pre


# --- preprocessing ---------------------------------------------------------------------------------------

def test_processor_path_matches_transformers_pil_clip_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                 image_mean=list(clip_common.CLIP_MEAN), image_std=list(clip_common.CLIP_STD))
    for h, w in ((32, 32), (40, 70), (300, 260)):
        x = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(h))
        u8 = (x * 255).round().clamp(0, 255).to(torch.uint8)
        ref = proc([im.permute(1, 2, 0).numpy() for im in u8], return_tensors="pt")["pixel_values"]
        ours = clip_common.processor_preprocess(x, 224)
        assert ours.shape == ref.shape == (2, 3, 224, 224)
        assert (ours - ref).abs().max() < 1e-5


def test_tensor_path_is_alignprops_torchvision_resize_and_differs_slightly_from_processor(hf_clip):
    """Measure tensor (bilinear, no crop) vs processor (uint8, bicubic, crop) on smooth random images."""
    folder, _ = hf_clip
    for size in (32, 512):
        x = _images(4, size, seed=size)
        t = clip_common.tensor_preprocess(x, 224)
        assert (t - _alignprop_pixels(x)).abs().max() < 1e-5
        p = clip_common.processor_preprocess(x, 224)
        diff = (t - p).abs()
        # differ, but by a small fraction of the normalised pixel range (about 7.4 units)
        assert 1e-3 < diff.mean() < 0.05, float(diff.mean())
    # on the scores of a (random) aesthetic predictor, relative to the spread across images
    head = os.path.join(os.path.dirname(folder), "head.pth")
    torch.save(_aesthetic_head_state(16), head)
    images = _images(16, 64, seed=1)
    scores = {how: load_aesthetic(folder, head, preprocess=how)(images) for how in clip_common.PREPROCESS}
    gap = (scores["tensor"] - scores["processor"]).abs().mean()
    assert 0 < gap < 0.2 * scores["tensor"].std(), (float(gap), float(scores["tensor"].std()))


# --- aesthetic ---------------------------------------------------------------------------------------------

def test_aesthetic_transformers_backbone_roundtrip(hf_clip, tmp_path):
    folder, model = hf_clip
    sd = _aesthetic_head_state(16)
    head = str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    torch.save(sd, head)
    reward = LaionAesthetic(clip=folder, head=head)
    assert reward.name == "aesthetic" and reward.differentiable
    x = _images(3, 32)
    with torch.no_grad():
        emb = model(pixel_values=_alignprop_pixels(x), input_ids=torch.zeros(1, 2, dtype=torch.long)).image_embeds
    expected = _head_by_hand(sd, emb)  # CLIPModel.forward normalises image_embeds
    got = reward(x, PROMPTS)
    assert got.shape == (3,) and torch.allclose(got, expected, atol=1e-4), (got, expected)
    assert got.std() > 1e-3  # different images score differently
    _assert_frozen_and_grad(reward, x, PROMPTS)
    assert not LaionAesthetic(clip=folder, head=head, preprocess="processor").differentiable


def test_aesthetic_head_strict_keys(hf_clip, tmp_path):
    folder, _ = hf_clip
    sd = _aesthetic_head_state(16)
    for name, bad in (("missing", {k: v for k, v in sd.items() if k != "layers.7.bias"}),
                      ("unexpected", {**sd, "layers.9.weight": torch.zeros(1, 1)}),
                      ("renamed", {k.replace("layers", "mlp"): v for k, v in sd.items()})):
        path = str(tmp_path / f"{name}.pth")
        torch.save(bad, path)
        with pytest.raises(BenchError, match="aesthetic"):
            load_aesthetic(folder, path)
    wide = str(tmp_path / "wide.pth")
    torch.save(_aesthetic_head_state(768), wide)
    with pytest.raises(BenchError, match="embeds to 16 dims but the head .* expects 768"):
        load_aesthetic(folder, wide)


def test_aesthetic_open_clip_backbone(open_clip_folder, tmp_path):
    """tiny-aesthetic's path: the same head format on an open_clip folder (HF layout)."""
    folder, model, _, pre = open_clip_folder
    sd = _aesthetic_head_state(16, seed=3)
    head = str(tmp_path / "head.pth")
    torch.save(sd, head)
    reward = load_aesthetic(folder, head, name="tiny-aesthetic")
    x = _images(3, 32)
    with torch.no_grad():
        pixels = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
        emb = model.encode_image(pixels, normalize=True)
    assert torch.allclose(reward(x, PROMPTS), _head_by_hand(sd, emb), atol=1e-4)
    _assert_frozen_and_grad(reward, x, PROMPTS)


@pytest.mark.skipif(not os.path.isfile(REAL_HEAD), reason="real aesthetic head not present (../shared/weights)")
def test_real_laion_aesthetic_head(tmp_path, monkeypatch):
    raw = torch.load(REAL_HEAD, map_location="cpu", weights_only=True)
    assert list(raw) == [f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    assert all(v.dtype == torch.float32 for v in raw.values())
    head = load_head(REAL_HEAD)
    assert [m.__class__.__name__ for m in head.layers] == ["Linear", "Dropout"] * 3 + ["Linear"] * 2
    assert [m.in_features for m in head.layers if isinstance(m, torch.nn.Linear)] == [768, 1024, 128, 64, 16]
    e = torch.randn(5, 768, generator=torch.Generator().manual_seed(0))
    e = e / e.norm(dim=-1, keepdim=True)
    with torch.no_grad():
        got = head(e).squeeze(-1)
    assert torch.allclose(got, _head_by_hand(raw, e), atol=1e-5)
    # found through $DIFFALIGN_WEIGHTS, and scoring end to end on a 768-d CLIP of the ViT-L/14 family
    monkeypatch.setenv("DIFFALIGN_WEIGHTS", os.path.join(ROOT, "..", "shared", "weights"))
    monkeypatch.delenv("DIFFALIGN_AESTHETIC_HEAD", raising=False)
    assert os.path.samefile(weights.locate(weights.AESTHETIC_HEAD, reward="aesthetic"), REAL_HEAD)
    model = _hf_clip(str(tmp_path / "clip768"), projection_dim=768, tokenizer=False)
    reward = LaionAesthetic(clip=str(tmp_path / "clip768"))
    x = _images(2, 32)
    with torch.no_grad():
        emb = model.get_image_features(pixel_values=_alignprop_pixels(x)).pooler_output
    assert torch.allclose(reward(x, PROMPTS[:2]), _head_by_hand(raw, emb / emb.norm(dim=-1, keepdim=True)), atol=1e-4)


# --- HPSv2 / OpenClipScore --------------------------------------------------------------------------------

def _open_clip_reference(model, images, prompts, pixels_fn=_alignprop_pixels, tokenizer=None):
    import open_clip

    tok = tokenizer or open_clip.get_tokenizer("ViT-H-14")
    with torch.no_grad():
        img, txt, _ = model(pixels_fn(images), tok(prompts))  # open_clip normalises both
    return (img * txt).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_hps_checkpoint_container_roundtrip(tmp_path, dtype):
    model = _open_clip_model()
    sd = {k: v.to(dtype) for k, v in model.state_dict().items()}
    model.load_state_dict(sd)  # the reference sees the same (rounded) weights
    path = str(tmp_path / "HPS_v2_compressed.pt")
    torch.save({"state_dict": sd}, path)
    reward = HPSv2(checkpoint=path, arch=TINY_H14)
    assert reward.name == "hpsv2" and reward.differentiable
    x = _images(3, 64)
    got = reward(x, PROMPTS)
    expected = _open_clip_reference(model, x, PROMPTS)
    assert got.shape == (3,) and torch.allclose(got, expected, atol=1e-5), (got, expected)
    assert (got.abs() <= 1 + 1e-6).all() and got.std() > 1e-4
    _assert_frozen_and_grad(reward, x, PROMPTS)
    # a bare state dict and a DistributedDataParallel 'module.' prefix load the same
    torch.save({"module." + k: v for k, v in sd.items()}, path)
    assert torch.allclose(HPSv21(checkpoint=path, arch=TINY_H14)(x, PROMPTS), got, atol=1e-6)


def test_hps_strict_keys_and_pickle_policy(tmp_path):
    sd = _open_clip_model().state_dict()
    path = str(tmp_path / "HPS_v2_compressed.pt")
    torch.save({"state_dict": {k: v for k, v in sd.items() if k != "ln_final.weight"}}, path)
    with pytest.raises(BenchError, match=r"does not match the model: missing 1 \(ln_final.weight\)"):
        HPSv2(checkpoint=path, arch=TINY_H14)
    torch.save({"state_dict": {**sd, "score_head.weight": torch.zeros(1)}}, path)
    with pytest.raises(BenchError, match=r"unexpected 1 \(score_head.weight\)"):
        HPSv2(checkpoint=path, arch=TINY_H14)
    # a container with a non-tensor object: refused by weights_only=True unless trusted
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=1e-5)}, path)
    with pytest.raises(BenchError, match="weights_only=True.*DIFFALIGN_TRUST_PICKLE=1"):
        HPSv2(checkpoint=path, arch=TINY_H14)
    assert HPSv2(checkpoint=path, arch=TINY_H14, trust_pickle=True).name == "hpsv2"
    with open(path, "wb") as f:
        f.write(b"<html>not a checkpoint</html>")
    with pytest.raises(BenchError, match="cannot be read as a weight file"):
        HPSv2(checkpoint=path, arch=TINY_H14)


def test_open_clip_score_from_hf_layout_folder(open_clip_folder, tmp_path):
    import open_clip

    folder, model, cfg, pre = open_clip_folder
    reward = OpenClipScore(folder, name="tiny-clip")
    assert reward.backbone.image_size == 32 and reward.backbone.mean == (0.5, 0.5, 0.5)
    x = _images(3, 32)

    def pixels(im):
        return (im - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)

    expected = _open_clip_reference(model, x, PROMPTS, pixels, open_clip.get_tokenizer("ViT-B-32", context_length=16))
    got = reward(x, PROMPTS)
    assert torch.allclose(got, expected, atol=1e-5) and (got.abs() <= 1).all()
    _assert_frozen_and_grad(reward, x, PROMPTS)
    # the .bin spelling of the folder loads the same
    other = tmp_path / "bin"
    other.mkdir()
    (other / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": pre}))
    torch.save(model.state_dict(), str(other / "open_clip_pytorch_model.bin"))
    assert torch.allclose(OpenClipScore(str(other))(x, PROMPTS), got, atol=1e-6)
    with pytest.raises(BenchError, match="images must be a float tensor"):
        reward(x[0], PROMPTS[:1])


def test_open_clip_folder_with_its_own_hf_tokenizer(tmp_path):
    """``text_cfg.hf_tokenizer_name`` in the config: the tokenizer files saved in the folder are used."""
    from open_clip.tokenizer import HFTokenizer

    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                           "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 190, "width": 32, "heads": 2, "layers": 1,
                        "hf_tokenizer_name": "tiny-char-bpe"}}
    folder = tmp_path / "oc-hf-tok"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    model = _open_clip_model(cfg, seed=5)
    save_file(dict(model.state_dict()), str(folder / "open_clip_model.safetensors"))
    with pytest.raises(BenchError, match="names a Hugging Face tokenizer .*tokenizer_config.json"):
        OpenClipScore(str(folder))
    _write_clip_tokenizer(str(folder))
    x = _images(3, 32)
    expected = _open_clip_reference(model, x, PROMPTS, lambda im: _alignprop_pixels(im, 32),
                                    HFTokenizer(str(folder), context_length=16))
    assert torch.allclose(OpenClipScore(str(folder))(x, PROMPTS), expected, atol=1e-5)


# --- PickScore, CLIPScore -----------------------------------------------------------------------------------

def _hf_reference(model, folder, images, prompts):
    """(cosine, logit_scale.exp()) straight from CLIPModel.forward."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=_alignprop_pixels(images), **ids)
    scale = model.logit_scale.exp()
    return out.logits_per_image.diagonal() / scale, scale


def test_pickscore_folder_roundtrip(hf_clip, tmp_path):
    folder, model = hf_clip
    # PickScore_v1 layout: the model folder, with the tokenizer in a separate processor folder
    model_dir, proc_dir = str(tmp_path / "PickScore_v1"), str(tmp_path / "processor")
    model.save_pretrained(model_dir)
    _write_clip_tokenizer(proc_dir)
    reward = PickScore(model=model_dir, processor=proc_dir)
    assert reward.name == "pickscore" and reward.differentiable
    x = _images(3, 32)
    cos, scale = _hf_reference(model, folder, x, PROMPTS)
    got = reward(x, PROMPTS)
    assert torch.allclose(got, scale * cos, atol=1e-4), (got, scale * cos)
    assert scale.item() == pytest.approx(math.exp(2.6592), rel=1e-4)  # CLIPConfig's initial logit scale
    assert (got.abs() <= scale + 1e-4).all()
    _assert_frozen_and_grad(reward, x, PROMPTS)
    # tokenizer files inside the model folder are used when no processor is named
    assert torch.allclose(PickScore(model=folder)(x, PROMPTS), got, atol=1e-5)
    # strict keys: a checkpoint without logit_scale is refused, not silently re-initialised

    sd = load_file(os.path.join(model_dir, "model.safetensors"))
    save_file({k: v for k, v in sd.items() if k != "logit_scale"}, os.path.join(model_dir, "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(BenchError, match="does not match CLIPModel: missing_keys.*logit_scale"):
        PickScore(model=model_dir, processor=proc_dir)


@pytest.mark.parametrize("variant,scale,clamp", [("hessel", 2.5, True), ("torchmetrics", 100.0, True),
                                                  ("cosine", 1.0, False)])
def test_clipscore_variants(hf_clip, variant, scale, clamp):
    folder, model = hf_clip
    reward = ClipScore(model=folder, variant=variant)
    x = _images(3, 32)
    cos, _ = _hf_reference(model, folder, x, PROMPTS)
    expected = scale * (cos.clamp_min(0) if clamp else cos)
    got = reward(x, PROMPTS)
    assert torch.allclose(got, expected, atol=1e-4 * scale), (got, expected)
    assert (got >= 0).all() if clamp else (got.abs() <= 1).all()


def test_clipscore_gradient_and_bad_variant(hf_clip):
    folder, _ = hf_clip
    reward = ClipScore(model=folder, variant="cosine")
    _assert_frozen_and_grad(reward, _images(3, 32), PROMPTS)
    with pytest.raises(BenchError, match="unknown variant 'clip'; accepted: hessel, torchmetrics, cosine"):
        ClipScore(model=folder, variant="clip")
    with pytest.raises(BenchError, match="unknown preprocess 'crop'; accepted: tensor, processor"):
        ClipScore(model=folder, preprocess="crop")


# --- finding weights: HF cache, env vars, missing files offline --------------------------------------------

def _fake_hf_cache(hub, repo_id, files: dict):
    """Lay files out as a pre-filled Hugging Face cache (refs/main -> snapshots/<hash>/...)."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    for name, writer in files.items():
        writer(str(snap / name))
    return str(snap)


@pytest.fixture()
def offline(monkeypatch):
    """The network switched off: any connection attempt fails the test."""
    def no_network(*args, **kwargs):
        raise AssertionError("a reward tried to open a network connection")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket.socket, "connect_ex", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


@pytest.fixture()
def clean_env(monkeypatch, tmp_path):
    for var in list(os.environ):
        if var.startswith("DIFFALIGN_") or var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    return tmp_path / "hf_home" / "hub"


def test_rewards_found_in_a_prefilled_hf_cache(clean_env, offline, hf_clip, monkeypatch):
    folder, model = hf_clip
    sd = _open_clip_model().state_dict()
    _fake_hf_cache(clean_env, "xswu/HPSv2", {"HPS_v2_compressed.pt": lambda p: torch.save({"state_dict": sd}, p)})
    _fake_hf_cache(clean_env, "yuvalkirstain/PickScore_v1", {"": lambda p: model.save_pretrained(p)})
    _fake_hf_cache(clean_env, "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", {"": _write_clip_tokenizer})
    assert HPSv2(arch=TINY_H14).backbone.source.endswith("snapshots/0123abcd/HPS_v2_compressed.pt")
    pick = get_reward("pickscore")  # the registry's no-argument construction
    x = _images(2, 32)
    cos, scale = _hf_reference(model, folder, x, PROMPTS[:2])
    assert torch.allclose(pick(x, PROMPTS[:2]), scale * cos, atol=1e-4)
    # an environment variable wins over the cache, and a wrong one is named
    monkeypatch.setenv("DIFFALIGN_HPS_CHECKPOINT", "/nonexistent/HPS_v2_compressed.pt")
    with pytest.raises(BenchError, match="DIFFALIGN_HPS_CHECKPOINT=/nonexistent/HPS_v2_compressed.pt does not exist"):
        HPSv2(arch=TINY_H14)


EXPECTED_IN_MESSAGE = {
    "aesthetic": ["sac+logos+ava1-l14-linearMSE.pth", "improved-aesthetic-predictor", "DIFFALIGN_AESTHETIC_HEAD",
                  "openai/clip-vit-large-patch14", "DIFFALIGN_CLIP_L14"],
    "hpsv2": ["HPS_v2_compressed.pt", "xswu/HPSv2", "DIFFALIGN_HPS_CHECKPOINT", "checkpoint="],
    "hpsv2.1": ["HPS_v2.1_compressed.pt", "xswu/HPSv2", "DIFFALIGN_HPS21_CHECKPOINT"],
    "pickscore": ["yuvalkirstain/PickScore_v1", "DIFFALIGN_PICKSCORE", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                  "DIFFALIGN_PICKSCORE_PROCESSOR"],
    "clipscore": ["openai/clip-vit-base-patch32", "DIFFALIGN_CLIPSCORE_MODEL", "config.json"],
}


@pytest.mark.parametrize("name", sorted(EXPECTED_IN_MESSAGE))
def test_missing_weights_fail_fast_offline(name, clean_env, offline):
    start = time.perf_counter()
    with pytest.raises(BenchError) as err:
        get_reward(name)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"reward {name!r}: missing")
    for part in EXPECTED_IN_MESSAGE[name] + ["Nothing is downloaded", str(clean_env)]:
        assert part in msg, (part, msg)
