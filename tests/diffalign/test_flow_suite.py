"""Rectified-flow models through the suite's own loader, samplers and harness (issue 28).

- SD3- and FLUX-shaped folders (random-weight, tiny; ``diffalign.flow_models``) load through ``load_pipeline`` and the
  suite's ``sample`` (the one sampler every method and the evaluation use, steps by ``diffalign.process``) equals
  ``StableDiffusion3Pipeline`` / ``FluxPipeline`` on them to 1e-5;
- a flow folder with a UNet and ``FlowMatchEulerDiscreteScheduler`` (the tiny flow world's layout) loads as a flow;
- 2 steps of a method run through the harness on each folder, and the run records the model's process.
"""
import json
import os

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from bench.core import run
from bench.core.config import resolve
from diffalign import flow_models, process
from diffalign.flow_models import FLUX, SD3
from diffalign.pipeline import load_pipeline
from diffalign.sampling import initial_noise, sample

PROMPTS = ["a red circle", "two blue squares"]
STEPS = 4
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tiny_flow_folders):
    return tiny_flow_folders




@pytest.mark.parametrize("kind", [SD3, FLUX])
def test_the_suites_sampler_equals_the_diffusers_pipeline(folders, kind):
    pipe = load_pipeline(folders[kind])
    assert process.kind(pipe.scheduler) == "flow" and pipe.unet.kind == kind
    x_T = initial_noise(pipe, len(PROMPTS), torch.Generator().manual_seed(0))
    side = pipe.latent_shape[-1] * 2  # the tiny VAE's factor
    if kind == SD3:  # classifier-free guidance in the suite's doubled batch
        ours = sample(pipe, PROMPTS, x_T, STEPS, 3.0, eta=0.0)
        ref = StableDiffusion3Pipeline.from_pretrained(folders[kind])
        call = dict(guidance_scale=3.0)
    else:  # FLUX.1 [dev]: no CFG (sampler guidance 1), the distilled guidance an input of the model (3.5)
        ours = sample(pipe, PROMPTS, x_T, STEPS, 1.0, eta=0.0)
        ref = FluxPipeline.from_pretrained(folders[kind])
        call = dict(guidance_scale=pipe.unet.guidance)
        x_T_ref = flow_models.pack_latents(x_T)
    ref.set_progress_bar_config(disable=True)
    want = ref(PROMPTS, latents=(x_T if kind == SD3 else x_T_ref).clone(), num_inference_steps=STEPS, height=side,
               width=side, output_type="pt", **call).images
    assert ours.images.shape == want.shape == (2, 3, side, side)
    assert (ours.images - want).abs().max().item() <= TOL
    assert ((want > 0) & (want < 1)).float().mean() > 0.9  # not a comparison of clamped values
    assert torch.equal(ours.timesteps, ref.scheduler.timesteps)  # the pipeline's own (shifted) schedule


def test_a_unet_folder_with_a_flow_matching_scheduler_is_a_flow(tmp_path):
    from bench.tinyworld import models as tiny_models

    comps = tiny_models.build_components(seed=0, objective="flow")
    tiny_models.save_pipeline(comps, str(tmp_path / "flow"))
    pipe = load_pipeline(str(tmp_path / "flow"))
    assert pipe.kind == "flow" and process.is_flow(pipe.scheduler)
    assert load_pipeline(str(tmp_path / "flow")).scheduler.config.shift == 1.0
    # the sampler's schedule: s from 1 to 1/T, Euler steps to the next s (the last to 0)
    t = process.set_timesteps(pipe.scheduler, 4)
    assert t[0] == 1000 and t[-1] == 1


@pytest.mark.parametrize("kind,method", [(SD3, "alignprop"), (FLUX, "ddpo-sf")])
def test_two_steps_of_a_method_run_on_each_folder(folders, tmp_path, kind, method):
    prompts = tmp_path / "eval.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    guidance = "3.0" if kind == SD3 else "1.0"
    args = [f"model={folders[kind]}", f"eval_prompts={prompts}", f"train_prompts={prompts}", "judge=null",
            "eval.metrics=[]", "reward=saturation", "steps=2", "checkpoint_every=2", "eval.every=2",
            "eval.grid_every=2", "eval.num_seeds=2", "eval.num_steps=2", "eval.kl_seeds=1", "sampler.num_steps=2",
            f"sampler.guidance={guidance}", f"eval.guidance={guidance}", "threads=1"]
    if method == "alignprop":
        args += ["alignprop.batch_size=2"]
    else:
        args += ["ddpo.samples_per_step=4", "ddpo.sample_batch_size=2", "ddpo.train_batch_size=2", "ddpo.grad_accum=2",
                 "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0", "sampler.eta=0.7"]
    out = str(tmp_path / "run")
    run.start(resolve(method, args), out)
    summary = json.load(open(os.path.join(out, "summary.json")))
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    assert summary["steps"] == 2 and manifest["status"] == "complete"
    assert manifest["model_process"] == summary["model_process"] == "flow" and manifest["model_architecture"] == kind
    assert manifest["sampler_variant"].startswith("flow-grpo-sde" if method == "ddpo-sf" else "euler-ode")
    assert all(v == v for v in (summary["eval_reward_before"], summary["eval_reward_after"]))  # finite, not NaN


def test_a_flux_run_with_classifier_free_guidance_is_refused_in_one_line(folders, tmp_path):
    from diffalign.errors import BenchError

    cfg = resolve("alignprop", [f"model={folders[FLUX]}", "judge=null", "eval.metrics=[]", "reward=saturation",
                                "sampler.guidance=3.0", "eval.guidance=1.0"])
    with pytest.raises(BenchError, match="FLUX-shaped.*accepted: sampler.guidance=1 and eval.guidance=1"):
        run.start(cfg, str(tmp_path / "run"))
