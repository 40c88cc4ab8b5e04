"""The sampler against diffusers itself and against closed-form Gaussians."""

import pytest
import torch

from bench import sampling, tiny_models
from bench.pipeline import load_pipeline

PROMPTS = ["a red circle", "two blue squares", "three green triangles on the left"]


def _latent_sd_components():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

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
    from diffusers import StableDiffusionPipeline

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


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers_scheduler_step(eta, spacing):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config({**tiny_models.SCHEDULER_CONFIG, "timestep_spacing": spacing, "steps_offset": 1})
    g = torch.Generator().manual_seed(0)
    timesteps = sampling.set_timesteps(sched, 4)
    for t in timesteps:
        # float64 latents, so both sides compute from the same float32 alphas without float32 rounding
        x, eps, z = (torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
        ref = sched.step(eps, t, x, eta=eta, variance_noise=z).prev_sample
        ours = sampling.ddim_step(sched, eps, int(t), x, 4, eta, noise=z).prev
        if torch.isnan(ref).any():
            # diffusers: sqrt(1 - a_prev - sigma^2) of a float32 rounding below 0 at t = 999, eta = 1
            assert t == 999 and eta == 1.0 and torch.isfinite(ours).all()
            continue
        # where 1 - a_prev - sigma^2 nearly cancels (t = 999, eta near 1), diffusers' float32 variance is
        # only good to ~1e-4 after the square root
        a_t, a_prev = sampling._alphas(sched, int(t), 4)
        direction = float((1 - a_prev - sampling.step_std(sched, int(t), 4, eta) ** 2).clamp(min=0).sqrt())
        tol = 1e-6 if direction > 0.05 else 1e-3
        assert torch.allclose(ours, ref, rtol=tol, atol=tol), (t, (ours - ref).abs().max())


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_log_prob_is_the_closed_form_gaussian(small_pixel_pipeline, eta, reduction):
    sched = small_pixel_pipeline.scheduler
    g = torch.Generator().manual_seed(3)
    timesteps = sampling.set_timesteps(sched, 5)
    for t in timesteps:
        t = int(t)
        x = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        eps = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        prev = torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64)
        out = sampling.ddim_step(sched, eps, t, x, 5, eta, prev=prev, reduction=reduction)
        # reference: the DDIM paper's mean and sigma, written out in float64
        prev_t = t - sched.config.num_train_timesteps // 5
        a_t = sched.alphas_cumprod[t].double()
        a_prev = sched.alphas_cumprod[prev_t].double() if prev_t >= 0 else sched.final_alpha_cumprod.double()
        std = float(eta * torch.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)))
        x0 = ((x - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
        mean = a_prev.sqrt() * x0 + (1 - a_prev - std ** 2).clamp(min=0).sqrt() * eps
        if std == 0:  # the last step with set_alpha_to_one: deterministic, no density
            assert out.log_prob is None and float(out.std) == 0
            continue
        dens = torch.distributions.Normal(mean, std).log_prob(prev).flatten(1)
        want = dens.mean(1) if reduction == "mean" else dens.sum(1)
        assert float(out.std) == pytest.approx(std, rel=1e-9)
        assert torch.allclose(out.log_prob, want, rtol=1e-6, atol=1e-6)


def test_sample_stores_a_consistent_trajectory(small_pixel_pipeline):
    pipe = small_pixel_pipeline
    x_T = sampling.initial_noise(pipe, 2, torch.Generator().manual_seed(0))
    traj = sampling.sample(pipe, PROMPTS[:2], x_T, 4, 2.0, 1.0, generator=torch.Generator().manual_seed(1))
    assert traj.latents.shape == (2, 5, 3, 8, 8) and traj.log_probs.shape == (2, 4)
    assert torch.isfinite(traj.log_probs).all()
    # re-scoring each stored transition with the same model reproduces the stored log-probs
    for i, t in enumerate(traj.timesteps):
        eps = sampling.guided_eps(pipe.unet, traj.latents[:, i], t, traj.cond, traj.uncond, 2.0)
        lp = sampling.ddim_step(pipe.scheduler, eps, int(t), traj.latents[:, i], 4, 1.0,
                                prev=traj.latents[:, i + 1]).log_prob
        assert torch.allclose(lp, traj.log_probs[:, i], atol=1e-5)


def test_per_sample_timesteps_equal_one_step_per_sample(small_pixel_pipeline):
    """DDPO trains on a different timestep per sample: the batched step must equal per-sample steps."""
    sched = small_pixel_pipeline.scheduler
    timesteps = sampling.set_timesteps(sched, 5)
    g = torch.Generator().manual_seed(4)
    t = timesteps[torch.tensor([0, 3, 4, 1])]
    x, eps, prev = (torch.randn(4, 3, 8, 8, generator=g) for _ in range(3))
    batched = sampling.ddim_step(sched, eps, t, x, 5, 1.0, prev=prev)
    for i in range(4):
        one = sampling.ddim_step(sched, eps[i:i + 1], int(t[i]), x[i:i + 1], 5, 1.0, prev=prev[i:i + 1])
        assert torch.allclose(batched.mean[i], one.mean[0], atol=1e-6)
        assert torch.allclose(batched.log_prob[i], one.log_prob[0], atol=1e-5)
