"""Preference pairs and the DPO machinery (diffalign/preference.py): pairs from scores, label noise, the pair-file
loader (Pick-a-Pic v2 columns, jsonl with paths, folders) and its one-line refusals, the forward process, the DPO
loss by hand, and the reference pass equal to the base model bit for bit."""
import io
import json
import math
import re

import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler
from PIL import Image

from diffalign import ddim, preference
from diffalign.errors import BenchError
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline


def _png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, "PNG")
    return buf.getvalue()


def test_pairs_from_groups_drop_ties_and_put_the_higher_score_first():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 3, 2, 2) / 10
    scores = torch.tensor([1.0, 3.0, 1.05, 5.0, 5.0, 2.0])  # two prompts, three samples each
    prompts = ["a"] * 3 + ["b"] * 3
    pairs = preference.pairs_from_groups(prompts, images, scores, group=3, tie_threshold=0.1)
    # prompt a: (1 vs 0), (1 vs 2); 0 vs 2 is a tie; prompt b: (3 vs 5), (4 vs 5); 3 vs 4 is a tie
    assert pairs.prompts == ["a", "a", "b", "b"]
    assert pairs.winners[:, 0, 0, 0].tolist() == pytest.approx([0.1, 0.1, 0.3, 0.4])
    assert pairs.losers[:, 0, 0, 0].tolist() == pytest.approx([0.0, 0.2, 0.5, 0.5])
    flipped = preference.flip_labels(pairs, 0.49, torch.Generator().manual_seed(0))
    swapped = [bool(torch.equal(w, lo)) for w, lo in zip(flipped.winners, pairs.losers)]
    assert any(swapped) and not all(swapped) and flipped.meta["label_noise"] == 0.49
    again = preference.flip_labels(pairs, 0.49, torch.Generator().manual_seed(0))
    assert torch.equal(again.winners, flipped.winners)  # seeded


def test_pick_a_pic_parquet_jsonl_paths_and_folders_load_the_same_pairs(tmp_path):
    red, blue, green = _png((255, 0, 0)), _png((0, 0, 255)), _png((0, 255, 0))
    pd.DataFrame({"caption": ["a red circle", "a tie", "a blue square"], "jpg_0": [red, red, green],
                  "jpg_1": [blue, blue, blue], "label_0": [1.0, 0.5, 0.0]}).to_parquet(tmp_path / "pap.parquet")
    pairs = preference.load_pairs(str(tmp_path / "pap.parquet"))
    assert pairs.prompts == ["a red circle", "a blue square"]  # the tie is dropped
    assert pairs.winners[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and pairs.winners[1, :, 0, 0].tolist() == [0, 0, 1]
    assert pairs.losers[1, :, 0, 0].tolist() == [0.0, 1.0, 0.0]
    folder = tmp_path / "folder"
    (folder / "img").mkdir(parents=True)
    for name, data in (("r.png", red), ("b.png", blue)):
        (folder / "img" / name).write_bytes(data)
    rows = [{"prompt": "a red circle", "image_0": "img/b.png", "image_1": "img/r.png", "winner": 1},
            {"prompt": "x", "image_0": "img/b.png", "image_1": "img/r.png", "winner": "tie"}]
    (folder / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (folder / "config.json").write_text(json.dumps({"labelled_by": "people"}))
    loaded = preference.load_pairs(str(folder), size=4)
    assert loaded.prompts == ["a red circle"] and loaded.winners.shape == (1, 3, 4, 4)
    assert loaded.winners[0, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and loaded.meta["labelled_by"] == "people"
    preference.save_pairs(pairs, str(tmp_path / "back.parquet"))  # the writer's files read back the same
    back = preference.load_pairs(str(tmp_path / "back.parquet"))
    assert back.prompts == pairs.prompts and torch.equal(back.winners, pairs.winners)


@pytest.mark.parametrize("write,match", [
    (lambda d: (d / "p.parquet").write_bytes(b"not a parquet file"), "cannot be read"),
    (lambda d: (d / "p.jsonl").write_text('{"prompt": "a", "image_0": "nope.png", "image_1": "nope.png", '
                                          '"winner": 0}\n'), "image file 'nope.png' does not exist"),
    (lambda d: (d / "p.jsonl").write_text('{"prompt": "a", "jpg_0": "x.png", "jpg_1": "x.png", "label_0": 2}\n'),
     "label_0 = 2; accepted: 1 (image 0 preferred), 0 (image 1 preferred), 0.5"),
    (lambda d: (d / "p.jsonl").write_text('{"prompt": "a", "image_0": "x", "image_1": "x", "winner": "left"}\n'),
     "winner = 'left'; accepted: 0, 1"),
    (lambda d: (d / "p.jsonl").write_text('{"prompt": "a", "left": "x", "right": "x", "winner": 0}\n'),
     "has columns"),
    (lambda d: (d / "p.csv").write_text("prompt\n"), "neither .parquet nor .jsonl"),
    (lambda d: (d / "p.jsonl").write_text('{"prompt": "a", "image_0": "bad.png", "image_1": "bad.png", '
                                          '"winner": 0}\n') and (d / "bad.png").write_text("no png"),
     "cannot decode the image"),
], ids=["damaged", "missing-image", "bad-label_0", "bad-winner", "no-image-columns", "csv", "not-an-image"])
def test_a_bad_pair_file_is_one_line_naming_what_is_accepted(tmp_path, write, match):
    write(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.name.startswith("p."))
    with pytest.raises(BenchError, match=re.escape(match)) as e:
        preference.load_pairs(str(path))
    assert "\n" not in str(e.value) and "accepted" in str(e.value)
    with pytest.raises(BenchError, match="holds no pairs.parquet or pairs.jsonl"):
        preference.load_pairs(str(tmp_path))


def test_forward_process_and_targets_are_diffusers():
    for kind in ("epsilon", "v_prediction"):
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
        g = torch.Generator().manual_seed(0)
        x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
        t = torch.tensor([0, 500, 999])
        assert torch.allclose(ddim.add_noise(sched, x0, t, noise), sched.add_noise(x0, noise, t), atol=1e-6)
        want = noise if kind == "epsilon" else sched.get_velocity(x0, noise, t)
        assert torch.allclose(ddim.training_target(sched, x0, t, noise), want, atol=1e-6)


def test_dpo_loss_by_hand_and_its_sign():
    m_w, m_l = torch.tensor([0.10, 0.20]), torch.tensor([0.30, 0.10])
    r_w, r_l = torch.tensor([0.12, 0.20]), torch.tensor([0.30, 0.15])
    out = preference.dpo_loss(m_w, m_l, r_w, r_l, beta=10.0)
    inside = [-5.0 * ((0.10 - 0.12) - (0.30 - 0.30)), -5.0 * ((0.20 - 0.20) - (0.10 - 0.15))]
    want = sum(-math.log(1 / (1 + math.exp(-z))) for z in inside) / 2
    assert float(out.loss) == pytest.approx(want, rel=1e-6) and out.inside.tolist() == pytest.approx(inside)
    # the policy's likelihood of the winner up (its error down): the loss down; of the loser up: the loss up
    assert float(preference.dpo_loss(m_w - 0.01, m_l, r_w, r_l, 10.0).loss) < float(out.loss)
    assert float(preference.dpo_loss(m_w, m_l - 0.01, r_w, r_l, 10.0).loss) > float(out.loss)
    assert torch.equal(preference.dpo_loss(m_w, m_l, r_w, r_l, 10.0, torch.ones(2)).loss, out.loss)
    # at the reference the loss is log 2 whatever beta
    assert float(preference.dpo_loss(r_w, r_l, r_w, r_l, 5000.0).loss) == pytest.approx(math.log(2))


def test_reference_pass_is_the_base_model_bit_for_bit(small_pixel_pipeline_dir):
    pipe = load_pipeline(small_pixel_pipeline_dir)
    params = add_lora(pipe.unet, seed=0)
    with torch.no_grad():
        for p in params:  # a trained adapter: the policy differs from the base model
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    fresh = load_pipeline(small_pixel_pipeline_dir)  # the base model, never adapted
    g = torch.Generator().manual_seed(2)
    x0 = torch.rand(4, 3, 8, 8, generator=g) * 2 - 1
    noise, t = torch.randn(4, 3, 8, 8, generator=g), torch.tensor([10, 300, 600, 990])
    cond = pipe.encode_prompts(["a red circle", "two blue squares"] * 2)
    ref = preference.denoising_errors(pipe, x0, t, noise, cond, reference=True)
    base = preference.denoising_errors(fresh, x0, t, noise, cond)
    policy = preference.denoising_errors(pipe, x0, t, noise, cond)
    assert torch.equal(ref, base.detach()) and not torch.allclose(policy, ref)
    assert policy.requires_grad and not ref.requires_grad
