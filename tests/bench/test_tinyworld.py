"""The tiny world's committed judge and base model, and the recipes that build them (bench/tinyworld/)."""
import json
import os

import numpy as np
import pytest
import torch
from conftest import ROOT

from bench.tinyworld import judge, pairs, pretrain
from bench.tinyworld.judge import evaluate, load_judge
from diffalign.pipeline import load_pipeline


def test_committed_judge_reads_renders():
    model = load_judge(os.path.join(ROOT, "models", "tiny-judge"))
    acc = evaluate(model, np.random.default_rng(777), 300)
    assert min(acc.values()) >= 0.97, acc
    blank = torch.zeros(4, 3, 32, 32)
    assert (model.read(blank)["count"] == 0).all()
    fid = model.fidelity(blank, ["a red circle"] * 4)
    assert fid["all"].sum() == 0  # an empty image is never faithful


def test_committed_base_model_is_a_standard_diffusers_folder():
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


@pytest.mark.slow
def test_recipes_run_and_write_loadable_folders(tmp_path):
    pretrain.main(["--out", str(tmp_path / "t2i"), "--steps", "2", "--batch", "4", "--save-every", "1"])
    pipe = load_pipeline(str(tmp_path / "t2i"))
    assert pipe.latent_shape == (3, 32, 32)
    assert os.path.isfile(str(tmp_path / "t2i") + ".state.pt")
    # restarting with more steps continues from the saved state
    pretrain.main(["--out", str(tmp_path / "t2i"), "--steps", "3", "--batch", "4", "--save-every", "1"])
    assert torch.load(str(tmp_path / "t2i") + ".state.pt", weights_only=False)["step"] == 3
    judge.main(["--out", str(tmp_path / "judge"), "--steps", "3", "--batch", "8", "--eval-samples", "20"])
    assert judge.load_judge(str(tmp_path / "judge")).read(torch.zeros(1, 3, 32, 32))["count"].shape == (1,)


def test_pair_recipe_is_deterministic_and_labels_by_the_hidden_rating(tmp_path):
    prompts = tmp_path / "two.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    a, meta = pairs.build("models/tiny-t2i", str(prompts), per_prompt=3, seed=0, tie=0.1)
    b, _ = pairs.build("models/tiny-t2i", str(prompts), per_prompt=3, seed=0, tie=0.1)
    assert meta["samples"] == 6 and meta["pairs"] == len(a) >= 1 and meta["labelled_by"] == "tiny-rating"
    assert torch.equal(a.winners, b.winners) and torch.equal(a.losers, b.losers) and a.prompts == b.prompts


@pytest.mark.slow
def test_the_flow_recipe_writes_a_flow_folder_and_a_resumed_run_is_the_unbroken_one(tmp_path):
    """``make flow-model`` at a few steps: a standard diffusers folder with a FlowMatchEulerDiscreteScheduler that
    loads as a flow, and a 3-step recipe stopped after 2 (``--stop-at``) and rerun gives the weights of the unbroken
    one, bit for bit."""
    args = ["--objective", "flow", "--batch", "4", "--save-every", "1", "--threads", "1"]
    pretrain.main(["--out", str(tmp_path / "once"), "--steps", "3", *args])
    pretrain.main(["--out", str(tmp_path / "twice"), "--steps", "3", "--stop-at", "2", *args])
    assert torch.load(str(tmp_path / "twice") + ".state.pt", weights_only=False)["step"] == 2
    pretrain.main(["--out", str(tmp_path / "twice"), "--steps", "3", *args])
    index = json.load(open(tmp_path / "once" / "model_index.json"))
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    once, twice = load_pipeline(str(tmp_path / "once")), load_pipeline(str(tmp_path / "twice"))
    assert once.kind == "flow" and once.latent_shape == (3, 32, 32)
    for (name, a), (_, b) in zip(once.unet.state_dict().items(), twice.unet.state_dict().items()):
        assert torch.equal(a, b), name
