"""Architectures of the tiny world's text-to-image model, built from configs (nothing downloaded).

The model is an ordinary diffusers text-to-image stack, just small:

- ``UNet2DConditionModel`` in pixel space (32x32 RGB), cross-attention at 16x16 and 8x8;
- a 2-layer ``CLIPTextModel`` (width 64);
- a word-level ``PreTrainedTokenizerFast`` over the grammar's 22 words (saved as ``tokenizer.json``,
  so loading it needs no download);
- a ``DDIMScheduler`` with the cosine ("squaredcos_cap_v2") schedule, x0 clipping and trailing spacing; or, for the
  tiny *flow* world (``objective="flow"``), a ``FlowMatchEulerDiscreteScheduler`` (rectified flow, no time shift:
  32x32 pixels need none) and the same UNet predicting the velocity.

``save_pipeline`` writes them in the standard diffusers folder layout (``model_index.json`` plus one
sub-folder per component), which is exactly what ``diffalign.pipeline.load_pipeline`` reads back, for
this world and for Stable Diffusion folders alike.
"""
from __future__ import annotations

import json
import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from diffalign import world
from diffalign.store import atomic_dir

PAD, UNK = "[PAD]", "[UNK]"
MAX_TOKENS = 8

UNET_CONFIG = dict(
    sample_size=world.SIZE, in_channels=3, out_channels=3,
    block_out_channels=(32, 64, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS)
# "trailing" spacing starts sampling at t = 999: with "leading" the first of 10 steps is t = 901, where the
# training inputs still carry 15 % of the (mostly black, x0 = -1) image, which pure noise lacks; measured on a
# half-trained checkpoint, trailing gives visibly cleaner backgrounds at 10 steps.
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True,
                        set_alpha_to_one=False, steps_offset=0, timestep_spacing="trailing",
                        prediction_type="epsilon")


def build_tokenizer():
    from transformers import PreTrainedTokenizerFast  # lazy: heavy package

    vocab = {tok: i for i, tok in enumerate([PAD, UNK] + world.VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, unk_token=UNK,
                                   model_max_length=MAX_TOKENS)


FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=1.0)
OBJECTIVES = ("eps", "flow")


def build_components(seed: int = 0, unet_config: dict | None = None, objective: str = "eps") -> dict:
    """Freshly initialised unet, text_encoder, tokenizer and scheduler (random weights); ``objective`` "eps" (the
    DDPM world) or "flow" (the rectified-flow world: the same networks, a flow-matching scheduler)."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel  # lazy: heavy
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=0,
                                 eos_token_id=0, **TEXT_CONFIG)
    return {
        "unet": UNet2DConditionModel(**(unet_config or UNET_CONFIG)),
        "text_encoder": CLIPTextModel(text_config),
        "tokenizer": tokenizer,
        "scheduler": (FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG) if objective == "flow"
                      else DDIMScheduler(**SCHEDULER_CONFIG)),
    }


def save_pipeline(components: dict, path: str) -> None:
    """Write components in the diffusers folder layout (atomically, as one folder)."""
    with atomic_dir(path) as tmp:
        index = {"_class_name": "DiffAlignTextToImagePipeline", "_diffusers_version": _diffusers_version()}
        for name in ("unet", "text_encoder", "tokenizer", "scheduler", "vae"):
            comp = components.get(name)
            if comp is None:
                continue
            sub = os.path.join(tmp, name)
            if name == "scheduler":
                comp.save_config(sub)
            else:
                comp.save_pretrained(sub)
            library = "transformers" if name in ("text_encoder", "tokenizer") else "diffusers"
            index[name] = [library, type(comp).__name__]
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)


def _diffusers_version() -> str:
    import diffusers  # lazy: heavy package

    return diffusers.__version__
