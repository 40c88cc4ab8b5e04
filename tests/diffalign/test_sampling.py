"""The samplers (diffalign/sampling.py) against diffusers' own pipeline, and the one counted UNet call."""
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from bench.tinyworld import models as tiny_models
from diffalign import ddim, sampling
from diffalign.costs import Costs
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline

PROMPTS = ["a red circle", "two blue squares", "three green triangles on the left"]


def _latent_sd_components():
    comps = tiny_models.build_components(seed=1)
    torch.manual_seed(1)
    comps["unet"] = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8)
    comps["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8, sample_size=16)
    # Stable Diffusion v1's scheduler settings
    comps["scheduler"] = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return comps


def test_eta0_sampler_reproduces_stable_diffusion_pipeline(tmp_path):
    comps = _latent_sd_components()
    sd = StableDiffusionPipeline(vae=comps["vae"], text_encoder=comps["text_encoder"], tokenizer=comps["tokenizer"],
                                 unet=comps["unet"], scheduler=comps["scheduler"], safety_checker=None,
                                 feature_extractor=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    x_T = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = sd(PROMPTS, num_inference_steps=5, guidance_scale=3.0, eta=0.0, latents=x_T.clone(), output_type="pt").images

    # the same weights through the suite's loader (standard folder layout written by diffusers itself)
    sd.save_pretrained(tmp_path / "sd")
    pipe = load_pipeline(str(tmp_path / "sd"))
    assert pipe.is_latent and pipe.latent_shape == (4, 8, 8)
    traj = sampling.sample(pipe, PROMPTS, x_T, num_steps=5, guidance=3.0, eta=0.0)
    assert traj.images.shape == ref.shape == (3, 3, 16, 16)
    assert torch.allclose(traj.images, ref, atol=1e-5), (traj.images - ref).abs().max()
    assert torch.isnan(traj.log_probs).all()  # eta = 0: no density
    # and the differentiable sampler gives the same images
    with torch.no_grad():
        img = sampling.sample_with_grad(pipe, PROMPTS, x_T, 5, 3.0, 0.0, checkpointing=False)
    assert torch.allclose(img, ref, atol=1e-5)


def test_sample_stores_a_consistent_trajectory(small_pixel_pipeline):
    pipe = small_pixel_pipeline
    x_T = sampling.initial_noise(pipe, 2, torch.Generator().manual_seed(0))
    traj = sampling.sample(pipe, PROMPTS[:2], x_T, 4, 2.0, 1.0, generator=torch.Generator().manual_seed(1))
    assert traj.latents.shape == (2, 5, 3, 8, 8) and traj.log_probs.shape == (2, 4)
    assert torch.isfinite(traj.log_probs).all()
    # re-scoring each stored transition with the same model reproduces the stored log-probs
    for i, t in enumerate(traj.timesteps):
        eps = sampling.guided_eps(pipe.unet, traj.latents[:, i], t, traj.cond, traj.uncond, 2.0)
        lp = ddim.ddim_step(pipe.scheduler, eps, int(t), traj.latents[:, i], 4, 1.0,
                            prev=traj.latents[:, i + 1]).log_prob
        assert torch.allclose(lp, traj.log_probs[:, i], atol=1e-5)


def test_replay_chain_reproduces_the_sampler_and_perturbs_only_the_given_steps(small_pixel_pipeline):
    pipe = small_pixel_pipeline
    params = add_lora(pipe.unet, seed=0)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x_T = sampling.initial_noise(pipe, 2, torch.Generator().manual_seed(0))
    traj = sampling.sample(pipe, PROMPTS[:2], x_T, 3, 3.0, 1.0, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    noises = [ddim.step_noise(x_T, g) for _ in range(3)]
    cond, uncond = sampling.embed(pipe, PROMPTS[:2], 3.0)
    xs = sampling.replay_chain(pipe, x_T, noises, cond, uncond, 3, 3.0, 1.0)
    assert torch.allclose(torch.stack(xs, 1), traj.latents[:, 1:], atol=1e-6)
    # from the middle, the same
    assert torch.allclose(sampling.replay_chain(pipe, xs[0], noises, cond, uncond, 3, 3.0, 1.0, start=1)[-1], xs[-1],
                          atol=1e-6)
    g = torch.Generator().manual_seed(2)
    u = [torch.randn(p.shape, generator=g) for p in params]
    before = [p.detach().clone() for p in params]
    pert = sampling.replay_chain(pipe, x_T, noises, cond, uncond, 3, 3.0, 1.0, perturb_steps=[1], params=params,
                                 direction=u, scale=0.5)
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # restored exactly
    assert torch.equal(pert[0], xs[0]) and not torch.allclose(pert[1], xs[1])  # step 0 untouched, step 1 moved
    with sampling.perturbed(params, u, 0.5):  # the same as running step 1 with the moved weights
        manual = sampling.replay_chain(pipe, xs[0], noises, cond, uncond, 3, 3.0, 1.0, start=1)[0]
    assert torch.allclose(pert[1], manual, atol=1e-6)


def test_guided_eps_is_the_one_counted_unet_call(small_pixel_pipeline):
    """CFG doubles the batch; backward passes are counted when the output stays in the graph (checkpointed or
    not, with the same value and gradient); a call without gradient counts forward only."""
    pipe = small_pixel_pipeline
    params = add_lora(pipe.unet, seed=0)
    with torch.no_grad():
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    cond, uncond = sampling.embed(pipe, PROMPTS[:2], 3.0)
    x = sampling.initial_noise(pipe, 2, torch.Generator().manual_seed(0))
    t = ddim.set_timesteps(pipe.scheduler, 4)[1]
    results = {}
    for name, kw in {"plain": {}, "grad": {"with_grad": True}, "checkpointed": {"checkpointing": True}}.items():
        costs = Costs()
        out = sampling.guided_eps(pipe.unet, x, t, cond, uncond, 3.0, costs, **kw)
        grads = torch.autograd.grad(out.square().sum(), params)
        results[name] = (out.detach(), grads, costs.unet_fwd, costs.unet_bwd)
    assert results["plain"][2:] == (4, 0) and results["grad"][2:] == (4, 4) and results["checkpointed"][2:] == (4, 4)
    for name in ("grad", "checkpointed"):
        assert torch.allclose(results[name][0], results["plain"][0])
        assert all(torch.allclose(a, b) for a, b in zip(results[name][1], results["plain"][1]))
    costs = Costs()
    sampling.guided_eps(pipe.unet, x, t, cond, None, 3.0, costs)  # no unconditional branch: no doubling
    assert (costs.unet_fwd, costs.unet_bwd) == (2, 0)


def test_trajectories_concatenate_along_the_batch(small_pixel_pipeline):
    pipe = small_pixel_pipeline
    g = torch.Generator().manual_seed(2)
    parts = [sampling.sample(pipe, PROMPTS[:2], sampling.initial_noise(pipe, 2, g), 3, 2.0, 1.0, generator=g)
             for _ in range(2)]
    whole = sampling.Trajectory.cat(parts)
    assert whole.latents.shape == (4, 4, 3, 8, 8) and whole.log_probs.shape == (4, 3)
    assert torch.equal(whole.latents[2:], parts[1].latents) and torch.equal(whole.uncond[:2], parts[0].uncond)
    assert torch.equal(whole.timesteps, parts[0].timesteps) and whole.images.shape[0] == 4
