"""SDXL-shaped folders (two text encoders, pooled embeddings, added time ids) through the suite's loader, samplers and
methods: the eta = 0 sampler against diffusers' own StableDiffusionXLPipeline on a random-weight tiny SDXL pipeline
saved by diffusers, and a 2-step AlignProp run on it."""
import pytest
import torch
from conftest import metrics_of, small_run_args
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from bench.core import run
from bench.core.config import resolve
from bench.tinyworld import models as tiny_models
from diffalign import sampling
from diffalign.errors import BenchError
from diffalign.pipeline import load_pipeline

PROMPTS = ["a red circle", "two blue squares", "three green triangles on the left"]


def _tiny_sdxl() -> StableDiffusionXLPipeline:
    """SDXL's structure at toy width: text encoders of width 32 (the second with a 32-wide projection), their hidden
    states concatenated to the UNet's 64-wide cross-attention, time ids embedded 8 wide (32 + 6 x 8 = 80)."""
    torch.manual_seed(3)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64, norm_num_groups=8, attention_head_dim=(4, 8), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=80)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), latent_channels=4,
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, sample_size=16,
                        scaling_factor=0.13025)
    tokenizer = tiny_models.build_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=tiny_models.MAX_TOKENS, pad_token_id=0,
                bos_token_id=0, eos_token_id=0, projection_dim=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**text)),
                                     text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text)),
                                     tokenizer=tokenizer, tokenizer_2=tiny_models.build_tokenizer(), unet=unet,
                                     scheduler=scheduler, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    _tiny_sdxl().save_pretrained(path)  # the folder layout written by diffusers itself
    return str(path)


def test_eta0_sampler_reproduces_stable_diffusion_xl_pipeline(sdxl_dir):
    ref_pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    ref_pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(len(PROMPTS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = ref_pipe(PROMPTS, num_inference_steps=5, guidance_scale=3.0, eta=0.0, latents=x_T.clone(),
                   output_type="pt").images

    pipe = load_pipeline(sdxl_dir)
    assert pipe.is_sdxl and pipe.is_latent and pipe.latent_shape == (4, 8, 8)
    assert pipe.unet.sdxl_time_ids.tolist() == [[16, 16, 0, 0, 16, 16]]  # (H, W, 0, 0, H, W) at 16 px
    traj = sampling.sample(pipe, PROMPTS, x_T, num_steps=5, guidance=3.0, eta=0.0)
    assert traj.images.shape == ref.shape == (3, 3, 16, 16)
    assert torch.allclose(traj.images, ref, atol=1e-5), (traj.images - ref).abs().max()
    with torch.no_grad():
        img = sampling.sample_with_grad(pipe, PROMPTS, x_T, 5, 3.0, 0.0, checkpointing=False)
    assert torch.allclose(img, ref, atol=1e-5)
    # the packed conditioning: the pooled embedding in the extra token, the unconditional input all zeros
    cond = pipe.encode_prompts(PROMPTS)
    assert cond.shape == (3, tiny_models.MAX_TOKENS + 1, 64) and cond[:, -1, :32].abs().sum() > 0
    assert pipe.encode_prompts([""]).abs().sum() == 0


def test_alignprop_runs_two_steps_on_the_tiny_sdxl_pipeline(sdxl_dir, tmp_path):
    out = str(tmp_path / "run")
    args = small_run_args(sdxl_dir, tmp_path) + ["steps=2", "judge=null", "reward=saturation", "eval.metrics=[]",
                                                 "alignprop.batch_size=2"]
    run.start(resolve("alignprop", args), out)
    m = metrics_of(out)
    assert m["step"].max() == 2 and (m["grad_norm"].dropna() > 0).all() and m["eval_reward_mean"].notna().any()


def test_text_encoder_2_without_an_sdxl_unet_is_refused(sdxl_dir, tmp_path, small_pixel_pipeline_dir):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(small_pixel_pipeline_dir, bad)
    shutil.copytree(f"{sdxl_dir}/text_encoder_2", bad / "text_encoder_2")
    with pytest.raises(BenchError, match="has text_encoder_2/ but its UNet takes no added text and time"):
        load_pipeline(str(bad))
