"""ImageReward: a random-weight model of the published architecture (narrowed: see TINY_*), saved in the
published container (ImageReward.pt state dict + med_config.json + a BERT vocab.txt), loaded strictly through
the suite's loader, scored against an independent functional computation, differentiated, and the
missing-files error checked with the network switched off.

What the tiny model shrinks (the layout, key names, dtypes, head and pre-processing are the published ones):
vision encoder ViT width 1024 -> 128 (16 -> 2 heads of 64), 24 -> 2 blocks, still patch 16 at 224 (197 tokens);
text encoder (med_config.json) hidden 768 -> 64, 12 -> 2 layers, 12 -> 2 heads, intermediate 3072 -> 128,
vocab 30524 -> a 224-token test vocabulary + [DEC]/[ENC], max positions 512 -> 40; the MLP head keeps
64 -> 1024 -> 128 -> 64 -> 16 -> 1 (its input is the text width).
"""
import json
import math
import os
import socket
import string
import time

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffalign.errors import BenchError
from rewards import get_reward
from rewards import imagereward as ir

TINY_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                 max_position_embeddings=40)
TINY_VISION = dict(image_size=224, patch=16, width=128, depth=2, heads=2, mlp_hidden=512)
WORDS = ("a an the of in on with and photo painting cat dog red blue green horse tree house sky "
         "small big two three sitting running castle").split()


def write_vocab(folder):
    """A small BERT WordPiece vocabulary in bert-base-uncased's layout ([PAD]=0, [UNK]=100, [CLS]=101, ...)."""
    toks = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.punctuation + string.digits + string.ascii_lowercase
    toks += list(chars) + ["##" + c for c in string.ascii_lowercase] + [w for w in WORDS if w not in chars]
    toks += ["##ing"]
    assert len(set(toks)) == len(toks)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(toks) + "\n")
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"do_lower_case": True, "model_max_length": 512}, f)
    return toks


def published_keys(vision_depth, text_layers):
    """The key layout of the published ImageReward.pt (625 keys for ViT-L + BERT-base), written out by hand."""
    keys = ["blip.visual_encoder." + k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight",
                                                 "patch_embed.proj.bias", "norm.weight", "norm.bias")]
    for i in range(vision_depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blip.visual_encoder.blocks.{i}.{m}.weight", f"blip.visual_encoder.blocks.{i}.{m}.bias"]
    t = "blip.text_encoder."
    keys += [t + "embeddings.position_ids", t + "embeddings.word_embeddings.weight",
             t + "embeddings.position_embeddings.weight", t + "embeddings.LayerNorm.weight",
             t + "embeddings.LayerNorm.bias"]
    for i in range(text_layers):
        for att in ("attention", "crossattention"):
            for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys += [f"{t}encoder.layer.{i}.{att}.{m}.weight", f"{t}encoder.layer.{i}.{att}.{m}.bias"]
        for m in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys += [f"{t}encoder.layer.{i}.{m}.weight", f"{t}encoder.layer.{i}.{m}.bias"]
    keys += ["blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias"]
    keys += [f"mlp.layers.{j}.{p}" for j in (0, 2, 4, 6, 7) for p in ("weight", "bias")]
    return keys


def test_published_key_count():
    assert len(published_keys(24, 12)) == 625  # the real file's entry count (ViT-L/16 + BERT-base)


def random_state(text_cfg, seed=0):
    """Random weights for every tensor (LayerNorms near 1, head scaled so that scores spread over ~1)."""
    g = torch.Generator().manual_seed(seed)
    model = ir.ImageRewardModel(text_cfg, TINY_VISION)
    state = {}
    for k, v in model.state_dict().items():
        if "LayerNorm.weight" in k or k.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
            state[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        elif k.startswith("mlp.layers.") and k.endswith("weight"):
            state[k] = torch.randn(v.shape, generator=g) / math.sqrt(v.shape[1])
        else:
            state[k] = 0.05 * torch.randn(v.shape, generator=g)
    state[ir.POSITION_IDS] = torch.arange(text_cfg["max_position_embeddings"]).expand(1, -1).clone()
    return state


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """ImageReward.pt + med_config.json + bert-base-uncased/vocab.txt in one folder, as the published files."""
    d = tmp_path_factory.mktemp("imagereward")
    toks = write_vocab(str(d / "bert-base-uncased"))
    med = {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
           "hidden_dropout_prob": 0.1, "initializer_range": 0.02, "layer_norm_eps": 1e-12, "model_type": "bert",
           "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(toks) + 2, "encoder_width": 768,
           "add_cross_attention": True, **TINY_TEXT}
    (d / "med_config.json").write_text(json.dumps(med, indent=2))
    state = random_state(ir.read_med_config(str(d / "med_config.json")))
    torch.save(state, d / "ImageReward.pt")
    return d, state, med


@pytest.fixture(scope="module")
def reward(tiny_files):
    return ir.ImageReward(model_dir=str(tiny_files[0]))


def test_container_layout(tiny_files):
    d, _, _ = tiny_files
    saved = torch.load(d / "ImageReward.pt", weights_only=True)
    assert list(saved) == list(dict.fromkeys(saved))  # a flat state dict
    assert sorted(saved) == sorted(published_keys(TINY_VISION["depth"], TINY_TEXT["num_hidden_layers"]))
    assert saved[ir.POSITION_IDS].dtype == torch.int64
    assert all(v.dtype == torch.float32 for k, v in saved.items() if k != ir.POSITION_IDS)
    assert tuple(saved["blip.visual_encoder.pos_embed"].shape) == (1, 197, 128)
    assert tuple(saved["mlp.layers.0.weight"].shape) == (1024, 64)


def test_loader_reads_architecture_and_weights(reward, tiny_files):
    _, state, med = tiny_files
    assert reward.model.vision == TINY_VISION
    assert reward.model.text_cfg["vocab_size"] == med["vocab_size"]
    loaded = reward.model.state_dict()
    assert set(loaded) == set(state) - {ir.POSITION_IDS}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert reward.differentiable and reward.name == "imagereward"


def test_tokenizer_ids(reward):
    ids, mask = reward.tokenize(["A red cats, [ENC]!", "a " * 50])
    with open(os.path.join(reward.files[2], "vocab.txt")) as f:
        vocab = f.read().split("\n")
    want = ["[CLS]", "a", "red", "cat", "##s", ",", "[ENC]", "!", "[SEP]"]
    n = len(vocab) - 1  # the file ends with a newline
    index = {t: i for i, t in enumerate(vocab)} | {"[DEC]": n, "[ENC]": n + 1}
    assert ids.shape == (2, 35) and mask.shape == (2, 35)
    assert ids[0, :9].tolist() == [index[t] for t in want] and ids[0, 9:].eq(0).all()
    assert mask[0].tolist() == [1] * 9 + [0] * 26
    assert mask[1].all() and ids[1, 0] == 101 and ids[1, -1] == 102  # truncated to 35 with [CLS] ... [SEP]


def reference_score(state, med, ids, mask, pixels):
    """ImageReward computed from the raw state dict with explicit matmuls (independent of rewards.imagereward)."""
    def lin(x, k):
        return x @ state[k + ".weight"].T + state[k + ".bias"]

    def ln(x, k, eps):
        return F.layer_norm(x, x.shape[-1:], state[k + ".weight"], state[k + ".bias"], eps)

    def mha(q, k, v, heads, bias=0.0):
        b, lq, d = q.shape
        sh = lambda x: x.reshape(b, -1, heads, d // heads).permute(0, 2, 1, 3)  # noqa: E731
        logits = sh(q) @ sh(k).transpose(-1, -2) / math.sqrt(d // heads) + bias
        return (logits.softmax(-1) @ sh(v)).permute(0, 2, 1, 3).reshape(b, lq, d)

    v = "blip.visual_encoder."
    x = F.conv2d(pixels, state[v + "patch_embed.proj.weight"], state[v + "patch_embed.proj.bias"], stride=16)
    x = torch.cat([state[v + "cls_token"].expand(len(x), 1, -1), x.flatten(2).transpose(1, 2)], 1)
    x = x + state[v + "pos_embed"]
    for i in range(TINY_VISION["depth"]):
        p = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, p + "norm1", 1e-6), p + "attn.qkv").split(x.shape[-1], -1)
        x = x + lin(mha(q, k, val, TINY_VISION["heads"]), p + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, p + "norm2", 1e-6), p + "mlp.fc1")), p + "mlp.fc2")
    img = ln(x, v + "norm", 1e-6)

    t, eps, heads = "blip.text_encoder.", med["layer_norm_eps"], med["num_attention_heads"]
    h = state[t + "embeddings.word_embeddings.weight"][ids] + state[t + "embeddings.position_embeddings.weight"][
        : ids.shape[1]]
    h = ln(h, t + "embeddings.LayerNorm", eps)
    pad = (1.0 - mask[:, None, None, :].float()) * -10000.0
    for i in range(med["num_hidden_layers"]):
        p = f"{t}encoder.layer.{i}."
        for att, ctx, bias in (("attention", None, pad), ("crossattention", img, 0.0)):
            c = h if ctx is None else ctx
            a = mha(lin(h, p + att + ".self.query"), lin(c, p + att + ".self.key"), lin(c, p + att + ".self.value"),
                    heads, bias)
            h = ln(lin(a, p + att + ".output.dense") + h, p + att + ".output.LayerNorm", eps)
        h = ln(lin(F.gelu(lin(h, p + "intermediate.dense")), p + "output.dense") + h, p + "output.LayerNorm", eps)
    r = h[:, 0]
    for j in (0, 2, 4, 6, 7):
        r = lin(r, f"mlp.layers.{j}")
    return (r.squeeze(-1) - 0.16717362830052426) / 1.0333394966054072


def test_scores_match_independent_computation(reward, tiny_files):
    _, state, med = tiny_files
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 224, 224, generator=g)
    prompts = ["a red cat", "two big horses running in the sky", "a photo of a castle", "a red cat"]
    scores = reward(images, prompts)
    ids, mask = reward.tokenize(prompts)
    mean = torch.tensor(ir.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(ir.CLIP_STD).view(1, 3, 1, 1)
    want = reference_score(state, med, ids, mask, (images - mean) / std)
    assert scores.shape == (4,) and scores.dtype == torch.float32 and torch.isfinite(scores).all()
    assert (scores - want).abs().max() < 1e-4, (scores, want)
    assert want.std() > 0.02  # scores spread far beyond the tolerance: not near-constant outputs
    # the prompt matters (same image, other prompt) and the image matters (same prompt, other image)
    other = reward(images[:1].expand(2, -1, -1, -1), ["a red cat", "a green house"])
    assert abs(other[0] - other[1]) > 1e-3 and abs(scores[0] - scores[3]) > 1e-3


def test_padding_is_ignored(reward):
    """A prompt's score does not depend on how much padding follows it (BERT's -10000 mask)."""
    images = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    ids, mask = reward.tokenize(["a red cat"])
    pixels = ir.preprocess_tensor(images)
    full = reward.model.score(ids, mask, pixels)
    short = reward.model.score(ids[:, :6], mask[:, :6], pixels)
    assert (full - short).abs().max() < 1e-5


def test_gradient_reaches_image(reward):
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 256, 320, generator=g).requires_grad_(True)
    prompts = ["a red cat", "a blue house"]
    reward(images, prompts).sum().backward()
    grad = images.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # directional derivative against central finite differences
    d = torch.randn(images.shape, generator=g)
    eps = 1e-2
    with torch.no_grad():
        fd = (reward(images + eps * d, prompts).sum() - reward(images - eps * d, prompts).sum()) / (2 * eps)
    analytic = (grad * d).sum()
    assert abs(fd - analytic) < 0.05 * abs(analytic) + 1e-4, (fd, analytic)
    assert not any(p.requires_grad for p in reward.model.parameters())


def test_preprocessing_matches_torchvision():
    tv = pytest.importorskip("torchvision.transforms")

    g = torch.Generator().manual_seed(4)
    norm = tv.Normalize(ir.CLIP_MEAN, ir.CLIP_STD)
    for h, w in ((256, 320), (300, 200), (224, 224), (181, 250)):
        img = (torch.rand(1, 3, h, w, generator=g) * 255).round() / 255
        refl = tv.Compose([tv.Resize(224, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(224), norm])
        assert (ir.preprocess_tensor(img) - refl(img)).abs().max() < 1e-5
        pil = Image.fromarray((img[0] * 255).round().byte().permute(1, 2, 0).numpy())
        package = tv.Compose([tv.Resize(224, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(224),
                              tv.ToTensor(), norm])(pil)
        assert torch.equal(ir.preprocess_pil(img)[0], package)


def test_pil_path(tiny_files, reward):
    pil = ir.ImageReward(model_dir=str(tiny_files[0]), preprocess="pil")
    assert not pil.differentiable
    images = (torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(5)) * 255).round() / 255
    prompts = ["a cat", "a dog"]
    assert (pil(images, prompts) - reward(images, prompts)).abs().max() < 1e-5  # no resize: the paths agree


def test_strict_loading(tiny_files, tmp_path):
    d, state, _ = tiny_files
    med = str(d / "med_config.json")

    def broken(change):
        s = dict(state)
        change(s)
        torch.save(s, tmp_path / "ImageReward.pt")
        with pytest.raises(BenchError) as e:
            ir.load_model(str(tmp_path / "ImageReward.pt"), med)
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "1 missing" in broken(lambda s: s.pop("blip.text_encoder.encoder.layer.1.crossattention.self.key.bias"))
    assert "1 unexpected" in broken(lambda s: s.update({"blip.itm_head.weight": torch.zeros(2, 64)}))
    assert "shape mismatch" in broken(lambda s: s.update({"mlp.layers.7.weight": torch.zeros(1, 8)}))
    assert "position_ids" in broken(lambda s: s.update({ir.POSITION_IDS: torch.zeros(1, 40, dtype=torch.long)}))
    (tmp_path / "ImageReward.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(BenchError, match="cannot read"):
        ir.load_model(str(tmp_path / "ImageReward.pt"), med)


def switch_network_off(monkeypatch):
    """Every socket connection or name lookup fails and is recorded."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network is switched off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return attempts


def test_found_through_registry_env_and_hf_cache(tiny_files, tmp_path, monkeypatch):
    d, _, _ = tiny_files
    attempts = switch_network_off(monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(ir.ENV_DIR, str(d))
    r = get_reward("imagereward")
    assert r.files[0] == str(d / "ImageReward.pt") and r.files[2] == str(d / "bert-base-uncased")

    # a Hugging Face cache laid out as hf_hub_download leaves it

    cache = tmp_path / "hub"
    for repo, files in (("THUDM/ImageReward", ("ImageReward.pt", "med_config.json")),
                        ("bert-base-uncased", ("vocab.txt", "tokenizer_config.json"))):
        root = cache / ("models--" + repo.replace("/", "--"))
        snap = root / "snapshots" / "0123abc"
        snap.mkdir(parents=True)
        (root / "refs").mkdir()
        (root / "refs" / "main").write_text("0123abc")
        src = d if repo.startswith("THUDM") else d / "bert-base-uncased"
        for f in files:
            os.symlink(src / f, snap / f)
    monkeypatch.delenv(ir.ENV_DIR)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    r = ir.ImageReward()
    assert r.files[0].startswith(str(cache)) and r.files[2].startswith(str(cache))
    x = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(6))
    assert torch.allclose(r(x, ["a cat"]), ir.ImageReward(model_dir=str(d))(x, ["a cat"]))
    assert not attempts


def test_missing_files_error_offline(tmp_path, monkeypatch):
    """No files anywhere: one BenchError line naming the files, their repos and the env var; no network, < 5 s."""
    attempts = switch_network_off(monkeypatch)
    monkeypatch.delenv(ir.ENV_DIR, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    start = time.monotonic()
    with pytest.raises(BenchError) as e:
        get_reward("imagereward")
    elapsed = time.monotonic() - start
    msg = str(e.value)
    assert elapsed < 5 and not attempts and "\n" not in msg
    for needle in ("ImageReward.pt", "med_config.json", "vocab.txt", "THUDM/ImageReward", "bert-base-uncased",
                   "DIFFALIGN_IMAGEREWARD_DIR", "weights="):
        assert needle in msg, needle

    # only the tokenizer missing: the message names just that
    d = tmp_path / "only-weights"
    d.mkdir()
    (d / "ImageReward.pt").write_bytes(b"")
    (d / "med_config.json").write_text("{}")
    monkeypatch.setenv(ir.ENV_DIR, str(d))
    with pytest.raises(BenchError, match=r"ImageReward: bert-base-uncased vocab.txt not found") as e:
        ir.ImageReward()
    assert not attempts


def test_bad_input(reward):
    with pytest.raises(BenchError, match="accepted"):
        reward(torch.rand(2, 3, 224, 224), ["only one prompt"])
    with pytest.raises(BenchError, match="preprocess"):
        ir.ImageReward(preprocess="bilinear")
