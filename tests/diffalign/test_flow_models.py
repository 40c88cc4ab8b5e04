"""SD3- and FLUX-shaped folders (diffalign/flow_models.py): the suite-style Euler sampler through ``FlowDenoiser``
against diffusers' own ``StableDiffusion3Pipeline`` / ``FluxPipeline`` on random-weight tiny folders that those
pipelines saved (images and latents to 1e-5), the text encodings against the pipelines' ``encode_prompt``, and LoRA
on the adapter (attaches with the suite's targets, changes the velocity, switches off, trains, round-trips)."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, StableDiffusion3Pipeline

from diffalign import flow_models
from diffalign.flow_models import FLUX, SD3, euler_sample, load_flow_model, pack_latents
from diffalign.lora import DEFAULT_TARGETS, add_lora, load_lora_state_dict, lora_state_dict, reference
from diffalign.sampling import guided_eps

PROMPTS = ["a red circle", "two blue squares", "three green triangles on the left"]
STEPS = 5
MAX_SEQ = 16   # the pipelines' max_sequence_length (T5 tokens), small for speed
SIZE = 16      # pixels: 8 x 8 latents
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tiny_flow_folders):
    return tiny_flow_folders


def _noise(n: int = len(PROMPTS)) -> torch.Tensor:
    return torch.randn(n, flow_models.LATENT_CHANNELS, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("dynamic", [False, True], ids=["shift", "dynamic-shift"])
def test_euler_sample_equals_stable_diffusion_3_pipeline(folders, dynamic):
    x_T = _noise()
    pipe = StableDiffusion3Pipeline.from_pretrained(folders[SD3])
    pipe.set_progress_bar_config(disable=True)
    if dynamic:  # the pipeline's mu from the transformer's patch count (SD3's max_shift default 1.16)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config({**pipe.scheduler.config,
                                                                      "use_dynamic_shifting": True})
    call = dict(num_inference_steps=STEPS, guidance_scale=3.0, height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    ref_images = pipe(PROMPTS, latents=x_T.clone(), output_type="pt", **call).images
    ref_latents = pipe(PROMPTS, latents=x_T.clone(), output_type="latent", **call).images

    model = load_flow_model(folders[SD3], max_sequence_length=MAX_SEQ)
    model.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    images, latents = euler_sample(model, PROMPTS, x_T, STEPS, 3.0, return_latents=True)
    assert images.shape == (3, 3, SIZE, SIZE) and model.latent_shape == (16, 8, 8)
    assert _max_abs(latents, ref_latents) <= TOL and _max_abs(images, ref_images) <= TOL
    assert ((images > 0) & (images < 1)).float().mean() > 0.9  # the comparison is not of clamped values
    assert (latents - x_T).abs().mean() > 0.1


def test_sd3_encoding_is_the_pipelines(folders):
    pipe = StableDiffusion3Pipeline.from_pretrained(folders[SD3])
    with torch.no_grad():  # as in the pipeline's __call__ (with gradients, CPU attention takes another kernel)
        cond, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                           max_sequence_length=MAX_SEQ)
    model = load_flow_model(pipe, max_sequence_length=MAX_SEQ)
    packed, empty = model.encode_prompts(PROMPTS), model.encode_prompts([""] * len(PROMPTS))
    # CLIP-L + CLIP-G (16 tokens each, 32 + 32 wide, zero-padded to T5's 80) then T5's 16 tokens, then the pooled token
    assert packed.shape == (3, 16 + MAX_SEQ + 1, 80) and cond.shape == (3, 16 + MAX_SEQ, 80)
    assert torch.equal(packed[:, :-1], cond) and torch.equal(packed[:, -1, :64], pooled)
    assert packed[:, :16, 64:].abs().sum() == 0 and packed[:, -1, 64:].abs().sum() == 0
    assert torch.equal(empty[:, :-1], neg) and torch.equal(empty[:, -1, :64], neg_pooled)
    assert empty.abs().sum() > 0  # SD3's empty prompt is encoded, not zeroed

    pipe.text_encoder_3 = pipe.tokenizer_3 = None  # a folder loaded without T5: zeros in its place, as the pipeline
    with torch.no_grad():
        cond = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                  max_sequence_length=MAX_SEQ)[0]
    packed = load_flow_model(pipe, max_sequence_length=MAX_SEQ).encode_prompts(PROMPTS)
    assert torch.equal(packed[:, :-1], cond) and cond[:, 16:].abs().sum() == 0


def test_euler_sample_equals_flux_pipeline(folders):
    x_T = _noise()
    pipe = FluxPipeline.from_pretrained(folders[FLUX])
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=STEPS, guidance_scale=3.5, height=SIZE, width=SIZE, max_sequence_length=MAX_SEQ)
    ref_images = pipe(PROMPTS, latents=pack_latents(x_T), output_type="pt", **call).images
    ref_latents = pipe(PROMPTS, latents=pack_latents(x_T), output_type="latent", **call).images  # packed tokens

    model = load_flow_model(folders[FLUX], sample_size=SIZE // 2, max_sequence_length=MAX_SEQ)
    images, latents = euler_sample(model, PROMPTS, x_T, STEPS, 3.5, return_latents=True)
    assert model.latent_shape == (16, 8, 8) and model.unet.guidance == flow_models.FLUX_GUIDANCE
    assert _max_abs(pack_latents(latents), ref_latents) <= TOL and _max_abs(images, ref_images) <= TOL
    assert ((images > 0) & (images < 1)).float().mean() > 0.9
    # the guidance input reaches the model, and the sampler leaves the adapter's guidance as it was
    other = euler_sample(model, PROMPTS, x_T, STEPS, 1.0)
    assert (other - images).abs().max() > 1e-4 and model.unet.guidance == flow_models.FLUX_GUIDANCE


def test_flux_encoding_is_the_pipelines(folders):
    pipe = FluxPipeline.from_pretrained(folders[FLUX])
    with torch.no_grad():  # as in the pipeline's __call__
        cond, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, max_sequence_length=MAX_SEQ)
    packed = load_flow_model(pipe, max_sequence_length=MAX_SEQ).encode_prompts(PROMPTS)
    assert packed.shape == (3, MAX_SEQ + 1, 48) and text_ids.shape == (MAX_SEQ, 3)
    assert torch.equal(packed[:, :-1], cond) and torch.equal(packed[:, -1, :32], pooled)
    assert packed[:, -1, 32:].abs().sum() == 0


@pytest.mark.parametrize("kind", [SD3, FLUX])
def test_lora_on_the_adapter_changes_the_velocity_and_trains(folders, kind):
    model = load_flow_model(folders[kind], sample_size=SIZE // 2, max_sequence_length=MAX_SEQ)
    den, x, t = model.unet, _noise(2), 700.0
    cond = model.encode_prompts(PROMPTS[:2])
    base = den(x, t, encoder_hidden_states=cond, return_dict=False)[0]
    assert base.shape == x.shape
    assert torch.equal(den(x, torch.full((2,), t), cond)[0], base)  # a number and per-sample timesteps agree

    params = add_lora(den, rank=2, alpha=2.0, seed=0)
    wrapped = {n.split(".lora_A")[0] for n, _ in den.named_parameters() if ".lora_A." in n}
    for target in DEFAULT_TARGETS:  # every suite target is found in the transformer's attention
        assert any(n.endswith("attn." + target) for n in wrapped), (target, sorted(wrapped)[:8])
    assert torch.equal(den(x, t, cond)[0], base)  # LoRA's B starts at zero
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in params:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    tuned = den(x, t, cond)[0]
    assert (tuned - base).abs().max() > 1e-3
    with reference(den) as ref:  # the adapter switched off: the base model exactly
        assert torch.equal(ref(x, t, cond)[0], base)

    # a gradient step through the suite's model call (CFG doubled batch, checkpointed) reaches both LoRA factors
    uncond = model.encode_prompts(["", ""])

    def loss():
        return guided_eps(den, x, t, cond, uncond, 3.0, with_grad=True, checkpointing=True).square().mean()

    before = loss()
    before.backward()
    named = {n: p for n, p in den.named_parameters() if "lora_" in n}
    assert len(named) == len(params) and all(p.grad is not None for p in params)
    for part in ("lora_A", "lora_B"):
        assert sum(p.grad.abs().sum() for n, p in named.items() if part in n) > 0
    torch.optim.SGD(params, lr=1e-2).step()
    with torch.no_grad():
        assert loss() < before
        tuned = den(x, t, cond)[0]

    state = lora_state_dict(den)
    assert state and all(k.startswith("transformer.") for k in state)
    with torch.no_grad():
        for p in params:
            p.zero_()
    load_lora_state_dict(den, state)
    assert torch.equal(den(x, t, cond)[0], tuned)
