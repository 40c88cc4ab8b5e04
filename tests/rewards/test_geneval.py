"""tiny-geneval (rewards/geneval.py): GenEval's all-or-nothing rule (Ghosh et al., arXiv 2310.11513) read by the
GenEval judge (models/tiny-geneval-judge, bench/tinyworld/geneval_judge.py).

Renders come from seed 4242, which neither the judge's training (seed 1) nor its held-out report (231011, 231012)
uses.  Floors sit below the committed judge's measured accuracies (docs/rewards.md) by a margin for 200 renders."""
import json
import os

import numpy as np
import pytest
import torch

from bench.tinyworld import geneval_judge
from diffalign import world
from diffalign.errors import BenchError
from rewards import get_reward
from rewards.geneval import DEFAULT_PATH, TinyGenEval, load_geneval_judge

pytestmark = pytest.mark.usefixtures("one_thread")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
N = 200


@pytest.fixture(scope="module")
def reward():
    return get_reward("tiny-geneval")


@pytest.fixture(scope="module")
def renders():
    """N renders: every third a single object with a position (each position in turn), the rest drawn freely."""
    rng = np.random.default_rng(4242)
    scenes = [world.sample_scene(rng, count=1, position=world.POSITIONS[(i // 3) % 4]) if i % 3 == 0
              else world.sample_scene(rng) for i in range(N)]
    images = np.stack([world.render(s, rng).transpose(2, 0, 1) for s in scenes])
    return torch.from_numpy(images), scenes


def _mismatch(scene: world.Scene, attribute: str) -> str:
    """The scene's caption with one attribute changed (None where the grammar has no such caption)."""
    c, s, n, p = scene.colour, scene.shape, scene.count, scene.position
    if attribute == "colour":
        colours = list(world.COLOURS)
        return world.caption(colours[(colours.index(c) + 1) % 4], s, n, p)
    if attribute == "shape":
        return world.caption(c, world.SHAPES[(world.SHAPES.index(s) + 1) % 3], n, p)
    if attribute == "count":
        return world.caption(c, s, n % 4 + 1)  # a count other than 1 carries no position
    return world.caption(c, s, 1, OPPOSITE[p]) if p else None


def test_rule_reads_renders_right_and_rejects_each_single_mismatch(reward, renders):
    x, scenes = renders
    right = reward.attributes(x, [s.caption for s in scenes])
    assert set(right) == {"shape", "colour", "count", "position", "all", "soft", "position_asked"}
    assert right["position_asked"].sum() >= N // 3
    acc = right["all"].mean().item()
    print(f"\nrule on {N} renders' own captions: {acc:.3f}; per attribute "
          + ", ".join(f"{k} {right[k].mean():.3f}" for k in ("shape", "colour", "count", "position")))
    assert acc >= 0.95
    assert right["shape"].mean() >= 0.99 and right["colour"].mean() >= 0.99 and right["count"].mean() >= 0.99
    assert torch.equal(right["all"], right["shape"] * right["colour"] * right["count"] * right["position"])
    for attribute in ("colour", "shape", "count", "position"):
        idx = [i for i, s in enumerate(scenes) if _mismatch(s, attribute)]
        got = reward.attributes(x[idx], [_mismatch(scenes[i], attribute) for i in idx])
        ok = right["all"][idx] == 1                      # renders the judge reads right on their own caption
        rejected = (got["all"][ok] == 0).float().mean().item()
        exact = (got[attribute][ok] == 0).float().mean().item()   # the changed attribute is the one read wrong
        others = [k for k in ("shape", "colour", "count", "position") if k != attribute
                  and not (attribute == "count" and k == "position")]
        kept = min(got[k][ok].mean().item() for k in others)
        print(f"{attribute} changed ({len(idx)} prompts): rule 0 on {rejected:.3f}, {attribute} partial 0 on "
              f"{exact:.3f}, the other partials 1 on >= {kept:.3f}")
        assert len(idx) >= (N // 3 if attribute == "position" else N)
        assert rejected >= 0.97 and exact >= 0.97 and kept >= 0.99


def test_one_scene_exactly(reward):
    scene = world.Scene("red", "circle", 1, "left", ((7.0, 16.0, 5.0),))
    x = torch.from_numpy(world.render(scene).transpose(2, 0, 1).copy())[None].repeat(6, 1, 1, 1)
    prompts = ["a red circle on the left", "a red circle", "a red circle on the right", "a green circle on the left",
               "a red square on the left", "two red circles"]
    a = reward.attributes(x, prompts)
    assert a["all"].tolist() == [1, 1, 0, 0, 0, 0]
    assert a["position"].tolist() == [1, 1, 0, 1, 1, 1]       # not asked counts as right
    assert a["colour"].tolist() == [1, 1, 1, 0, 1, 1]
    assert a["shape"].tolist() == [1, 1, 1, 1, 0, 1]
    assert a["count"].tolist() == [1, 1, 1, 1, 1, 0]
    assert a["position_asked"].tolist() == [1, 0, 1, 1, 1, 0]
    assert torch.equal(reward(x, prompts), a["all"])           # the value is the rule exactly
    assert reward.last_terms["tiny-geneval/position"].tolist() == [1, 1, 0, 1, 1, 1]
    assert a["soft"][0] > 0.9 and a["soft"][1] > a["soft"][0] - 1e-6 and (a["soft"][2:] < 0.1).all()
    # a blank image has no object: shape and colour are not read right whatever the argmax says
    blank = reward.attributes(torch.zeros(1, 3, 32, 32), ["a red circle"])
    assert blank["all"].item() == 0 and blank["shape"].item() == 0 and blank["count"].item() == 0


def test_gradient_is_the_soft_scores_and_raises_it():
    hard, soft = get_reward("tiny-geneval"), get_reward("tiny-geneval-soft")
    assert hard.differentiable and soft.differentiable and soft.name == "tiny-geneval-soft"
    # objects at the edge of the asked region, dimmed, on a grey noisy background: soft scores from ~0 to ~1
    rng = np.random.default_rng(5)
    scenes = [world.Scene("blue", "square", 1, None, ((12.0, 16.0, 5.0),)),
              world.Scene("yellow", "triangle", 1, None, ((16.0, 20.0, 5.0),)),
              world.Scene("green", "circle", 3, None, ((8.0, 8.0, 4.0), (20.0, 10.0, 4.0), (14.0, 22.0, 4.0))),
              world.Scene("red", "circle", 2, None, ((10.0, 10.0, 5.0), (22.0, 20.0, 5.0)))]
    prompts = ["a blue square on the left", "a yellow triangle on the bottom", "three green circles", "two red circles"]
    x = torch.from_numpy(np.stack([world.render(s).transpose(2, 0, 1) for s in scenes]))
    x = (x * 0.5 + 0.2 + 0.15 * torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))).clamp(0, 1)
    img = x.clone().requires_grad_(True)
    value = hard(img, prompts)
    assert set(value.tolist()) <= {0.0, 1.0}
    value.sum().backward()
    g_hard = img.grad.clone()
    img.grad = None
    s0 = soft(img, prompts)
    s0.sum().backward()
    assert torch.equal(g_hard, img.grad)                     # straight-through: the soft score's gradient
    g = img.grad
    assert torch.isfinite(g).all() and (g.flatten(1).norm(dim=1) > 0).all()
    with torch.no_grad():
        step = 0.1 * g / g.flatten(1).norm(dim=1)[:, None, None, None]    # L2 norm 0.1 over 3072 values
        s0, s1, s_down = s0.detach(), soft(x + step, prompts), soft(x - step, prompts)
    print(f"\nsoft score {s0.numpy().round(4)} -> {s1.numpy().round(4)} after an L2 step of 0.1 along "
          f"the gradient ({s_down.numpy().round(4)} against it)")
    odds = lambda s: s / (1 - s)  # noqa: E731
    assert (odds(s1) > 1.5 * odds(s0)).all() and (s_down < s0).all()
    assert s0.max() > 0.5 and s0.min() < 0.01                # both ends of the range are covered


def test_bad_prompts_name_what_is_accepted(reward):
    x = torch.zeros(1, 3, 32, 32)
    for bad in ("a photo of a cat", "two red circles on the left", "a purple circle"):
        with pytest.raises(BenchError, match=r"reward 'tiny-geneval': prompt .* is not a tiny-world caption; "
                                             r"accepted: tiny-world captions 'COUNT COLOUR SHAPE \[on the POSITION\]'"):
            reward(x, [bad])
    with pytest.raises(BenchError, match="1 images but 2 prompts"):
        reward(x, ["a red circle", "a red circle"])


def test_committed_judge_reports_its_accuracy_and_is_small():
    with open(os.path.join(DEFAULT_PATH, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(os.path.dirname(DEFAULT_PATH), "tiny-judge", "config.json")) as f:
        heldout = json.load(f)
    assert cfg["seed"] != heldout["seed"] and "blocks" in cfg and "blocks" not in heldout
    assert os.path.getsize(os.path.join(DEFAULT_PATH, "model.safetensors")) < 1_000_000
    for kind, floor in (("clean", 0.99), ("corrupted", 0.98)):
        acc = cfg["heldout_accuracy"][kind]
        assert acc["n"] == 2000 and min(acc[k] for k in ("colour", "shape", "count")) >= floor
        assert acc["position"] >= 0.9 and acc["asked_position"] >= 0.95 and acc["rule"] >= 0.95
        assert acc["agreement_with_heldout_judge"]["all"] >= 0.97


def test_recipe_writes_a_loadable_folder_deterministic_for_its_seed(tmp_path):
    args = ["--steps", "3", "--batch", "8", "--eval-samples", "24", "--threads", "1", "--heldout-judge", ""]
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        geneval_judge.main(args + ["--out", str(tmp_path / name), "--seed", str(seed)])
    a, b, c = (load_geneval_judge(str(tmp_path / n)).state_dict() for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    with open(tmp_path / "a" / "config.json") as f:
        cfg = json.load(f)
    assert cfg["seed"] == 3 and cfg["steps"] == 3 and set(cfg["heldout_accuracy"]) == {"clean", "corrupted"}
    assert {"colour", "shape", "count", "position", "rule"} <= set(cfg["heldout_accuracy"]["clean"])
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]   # written atomically, nothing left over
    r = TinyGenEval(str(tmp_path / "a"))
    out = r(torch.rand(4, 3, 64, 64), ["a red circle", "two blue squares", "a green triangle on the top",
                                       "four yellow circles"])
    assert out.shape == (4,) and set(out.tolist()) <= {0.0, 1.0}
    with pytest.raises(BenchError, match="lacks config.json, model.safetensors.*make geneval-judge"):
        TinyGenEval(str(tmp_path / "missing"))


def test_agreement_tool_on_a_small_pipeline(small_pixel_pipeline_dir, tmp_path):
    from bench.tools import geneval_agreement
    out = geneval_agreement.measure(small_pixel_pipeline_dir, seeds=1, num_steps=2, grid=str(tmp_path / "g.png"))
    assert out["samples"] == 96 and out["tiny_geneval_position_where_asked"]["n"] == 48
    assert out["tiny_geneval_rule_without_position_captions"]["n"] == 48
    for k in ("colour", "shape", "count", "all"):
        assert 0.0 <= out["agreement"][k]["mean"] <= 1.0
    assert out["agreement"]["all"]["mean"] <= min(out["agreement"][k]["mean"] for k in ("colour", "shape", "count"))
    # the rule holds only where every partial does
    assert out["tiny_geneval_rule"]["mean"] <= min(v["mean"] for v in out["tiny_geneval"].values())
    assert len(out["disagreements"]) <= 48 and (tmp_path / "g.png").exists() == bool(out["disagreements"])


def test_only_the_geneval_rules_declare_the_judges_fidelity_as_their_gold():
    # the run curve draws a reward beside the held-out judge's fidelity when the reward says that is its gold
    import rewards

    golds = {name: getattr(rewards._import_attr(target), "gold", None) for name, target in rewards.REGISTRY.items()}
    assert {n for n, g in golds.items() if g is not None} == {"tiny-geneval", "tiny-geneval-soft"}
    assert golds["tiny-geneval"] == "fidelity" and TinyGenEval.gold == "fidelity"
