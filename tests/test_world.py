"""The tiny world: grammar, renders, the committed judge and the committed base model's files."""
import os

import numpy as np
import pytest
import torch

from bench import world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grammar_round_trips():
    caps = world.all_captions()
    assert len(caps) == len(set(caps)) == 96
    for c in caps:
        a = world.parse_caption(c)
        assert world.caption(a["colour"], a["shape"], a["count"], a["position"]) == c
    for bad in ["two red circle", "a red circles", "five red circles", "two red circles on the left", "a pink circle"]:
        with pytest.raises(ValueError, match="not a tiny-world caption"):
            world.parse_caption(bad)


def _components(mask):
    """Count 4-connected components (the ground truth a judge has to read)."""
    seen, n = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        while stack:
            cy, cx = stack.pop()
            if 0 <= cy < mask.shape[0] and 0 <= cx < mask.shape[1] and mask[cy, cx] and not seen[cy, cx]:
                seen[cy, cx] = True
                stack += [(cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)]
    return n


def test_renders_show_what_the_caption_says():
    rng = np.random.default_rng(0)
    for _ in range(40):
        s = world.sample_scene(rng)
        img = world.render(s, rng)
        assert img.shape == (32, 32, 3) and 0 <= img.min() and img.max() <= 1
        assert _components(img.max(-1) > 0.5) == s.count
        bright = img[img.max(-1) > 0.5]
        want = np.array(world.COLOURS[s.colour]) / 255
        assert np.abs(bright.mean(0) / bright.mean(0).max() - want / want.max()).max() < 0.25
    s = world.scene_from_caption("a blue square on the left", rng)
    assert s.count == 1 and s.objects[0][0] < 12


def test_committed_judge_reads_renders():
    from bench.judge import evaluate, load_judge

    judge = load_judge(os.path.join(ROOT, "models", "tiny-judge"))
    acc = evaluate(judge, np.random.default_rng(777), 300)
    assert min(acc.values()) >= 0.97, acc
    blank = torch.zeros(4, 3, 32, 32)
    assert (judge.read(blank)["count"] == 0).all()
    fid = judge.fidelity(blank, ["a red circle"] * 4)
    assert fid["all"].sum() == 0  # an empty image is never faithful


def test_committed_base_model_is_a_standard_diffusers_folder():
    import json

    from bench.pipeline import load_pipeline

    path = os.path.join(ROOT, "models", "tiny-t2i")
    index = json.load(open(os.path.join(path, "model_index.json")))
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    assert size < 20e6
    pipe = load_pipeline(path)
    assert pipe.latent_shape == (3, 32, 32) and not pipe.is_latent
    ids = pipe.tokenizer(["two red circles"], padding="max_length", max_length=8).input_ids[0]
    assert pipe.tokenizer.convert_ids_to_tokens(ids[:3]) == ["two", "red", "circles"]


def test_recipes_run_and_write_loadable_folders(tmp_path):
    from bench import judge, pretrain
    from bench.pipeline import load_pipeline

    pretrain.main(["--out", str(tmp_path / "t2i"), "--steps", "2", "--batch", "4", "--save-every", "1"])
    pipe = load_pipeline(str(tmp_path / "t2i"))
    assert pipe.latent_shape == (3, 32, 32)
    assert os.path.isfile(str(tmp_path / "t2i") + ".state.pt")
    # restarting with more steps continues from the saved state
    pretrain.main(["--out", str(tmp_path / "t2i"), "--steps", "3", "--batch", "4", "--save-every", "1"])
    assert torch.load(str(tmp_path / "t2i") + ".state.pt", weights_only=False)["step"] == 3
    judge.main(["--out", str(tmp_path / "judge"), "--steps", "3", "--batch", "8", "--eval-samples", "20"])
    assert judge.load_judge(str(tmp_path / "judge")).read(torch.zeros(1, 3, 32, 32))["count"].shape == (1,)
