"""Diffusion-DPO (methods/diffusion_dpo.py): its pair sources (a base-model pool and online samples ranked by a
reward, counted as training cost), updates that raise the implicit preference of the pairs they train on, a run
killed and resumed."""
import pytest
import torch
from conftest import assert_resumes_to_the_same_run, method_context, small_run_args

from bench.core.config import resolve
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from diffalign.preference import Pairs, save_pairs
from methods import diffusion_dpo
from rewards import get_reward


def _context(pipe_dir, overrides, reward="saturation"):
    cfg = resolve("diffusion-dpo", ["model=x", f"reward={reward}", "sampler.num_steps=2"] + overrides)
    pipe = load_pipeline(pipe_dir)
    return method_context(cfg, pipe, add_lora(pipe.unet, 4, 4.0, seed=0), get_reward(reward))


def test_base_pool_and_online_pairs_are_ranked_by_the_reward_and_counted(small_pixel_pipeline_dir):
    ctx = _context(small_pixel_pipeline_dir, ["diffusion_dpo.pairs=base", "diffusion_dpo.pool_prompts=2",
                                              "diffusion_dpo.samples_per_prompt=3", "diffusion_dpo.batch_size=2"])
    m = diffusion_dpo.Method(ctx)
    fixed = m.pairs.fixed
    sat = get_reward("saturation")
    assert 1 <= len(fixed) <= 2 * 3 and fixed.meta == {"source": "base", "labelled_by": "saturation"}
    assert (sat(fixed.winners, fixed.prompts) > sat(fixed.losers, fixed.prompts)).all()
    assert ctx.costs.images == 6 and ctx.costs.reward_queries == 6  # the pool is training cost
    out = m.step()
    assert out["pairs"] == 2 and ctx.costs.images == 6  # offline from then on
    online = _context(small_pixel_pipeline_dir, ["diffusion_dpo.pairs=online", "diffusion_dpo.prompts_per_step=2",
                                                 "diffusion_dpo.samples_per_prompt=2", "diffusion_dpo.batch_size=3"])
    m = diffusion_dpo.Method(online)
    assert online.costs.images == 0
    out = m.step()
    assert online.costs.images == 4 and online.costs.reward_queries == 4 and out["pairs"] in (0, 3)


def test_updates_raise_the_implicit_preference_of_their_pairs(small_pixel_pipeline_dir, tmp_path):
    g = torch.Generator().manual_seed(0)
    pairs = Pairs(["a red circle", "two blue squares"], torch.rand(2, 3, 8, 8, generator=g),
                  torch.rand(2, 3, 8, 8, generator=g), {})
    save_pairs(pairs, str(tmp_path / "p.parquet"))
    ctx = _context(small_pixel_pipeline_dir, [f"diffusion_dpo.pairs={tmp_path / 'p.parquet'}",
                                              "diffusion_dpo.batch_size=8", "diffusion_dpo.lr=0.003",
                                              "diffusion_dpo.beta=2000.0"])
    m = diffusion_dpo.Method(ctx)
    first = m.step()
    assert first["loss"] == pytest.approx(0.6931, abs=1e-4)  # at the reference: log 2
    margins = [m.step()["implicit_margin"] for _ in range(8)]
    assert sum(margins[-4:]) / 4 > 0  # the policy now prefers the winners more than the reference does


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "diffusion_dpo.pairs=base", "diffusion_dpo.pool_prompts=2", "diffusion_dpo.samples_per_prompt=2",
        "diffusion_dpo.batch_size=4", "diffusion_dpo.lr=0.01", "reward=saturation", "eval.metrics=[tiny-clip]"]
    a, manifest = assert_resumes_to_the_same_run("diffusion-dpo", args, tmp_path)
    assert manifest["variant"] == "diffusion-dpo/pairs-base" and (a["grad_norm"].iloc[1:] > 0).all()
    assert a["images"].iloc[0] == 4  # the base pool, drawn again identically on resume
