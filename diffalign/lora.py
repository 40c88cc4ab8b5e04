"""What a run trains: LoRA on the UNet's attention projections, through peft (as trl and the AlignProp code do), or
the whole UNet (``finetune: full``).

Either way the frozen base model stays at hand as the reference (``reference``): with LoRA it is the same UNet with
its adapter switched off (no second copy); with full fine-tuning it is a frozen copy of the UNet taken before
training.  ``trainable_state_dict`` / ``load_trainable_state_dict`` hold what the run changes (the adapter, or
every UNet weight), which is what checkpoints carry.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os

import torch
from safetensors.torch import load_file, save_file

from diffalign.store import atomic_dir

DEFAULT_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


def add_lora(unet, rank: int = 4, alpha: float = 4.0, targets=DEFAULT_TARGETS, init: str | bool = "gaussian",
             seed: int = 0) -> list[torch.nn.Parameter]:
    """Attach a LoRA adapter (the base weights stay frozen) and return its trainable parameters.

    LoRA weights are kept in float32 when the base weights are fp16/bf16 (mixed precision on GPU)."""
    from peft import LoraConfig  # lazy: heavy package (pulls transformers)

    torch.manual_seed(seed)  # peft draws the A matrices from torch's global RNG
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=init, target_modules=list(targets)))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
        p.requires_grad_(True)
    return params


REFERENCE_ATTR = "_diffalign_reference"  # full fine-tuning: the frozen copy, kept outside the module tree


def make_full_finetune(unet) -> list[torch.nn.Parameter]:
    """Train every UNet weight (in float32); a frozen copy of the base UNet is kept as the reference."""
    reference = copy.deepcopy(unet).requires_grad_(False).eval()
    unet.__dict__[REFERENCE_ATTR] = reference  # not a submodule: not in state_dict, parameters() or .to()
    unet.float().requires_grad_(True)
    return list(unet.parameters())


def is_full_finetune(unet) -> bool:
    return REFERENCE_ATTR in unet.__dict__


@contextlib.contextmanager
def reference(unet):
    """The frozen base model: the same UNet with its LoRA adapter switched off, or the frozen copy kept by full
    fine-tuning (moved to the UNet's device on first use)."""
    if is_full_finetune(unet):
        ref = unet.__dict__[REFERENCE_ATTR]
        device = next(unet.parameters()).device
        if next(ref.parameters()).device != device:
            ref.to(device)
        yield ref
        return
    unet.disable_adapters()
    try:
        yield unet
    finally:
        unet.enable_adapters()


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """What the run trains: the adapter's weights, or every UNet weight under full fine-tuning."""
    if is_full_finetune(unet):
        return {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
    from peft.utils import get_peft_model_state_dict  # lazy: heavy package

    return {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    if is_full_finetune(unet):
        unet.load_state_dict(state)
        return
    from peft.utils import set_peft_model_state_dict  # lazy: heavy package

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"LoRA state has keys the model lacks: {unexpected[:3]}")


def save_lora(unet, path: str, config: dict) -> None:
    """Write the adapter as ``pytorch_lora_weights.safetensors`` (keys ``unet.<peft key>``, the form
    diffusers' ``load_lora_weights`` reads) plus ``adapter_config.json``; atomically, as one folder."""
    with atomic_dir(path) as tmp:
        if is_full_finetune(unet):  # the whole UNet, as diffusers saves one (plus the run's description)
            unet.save_pretrained(tmp)
            with open(os.path.join(tmp, "finetune.json"), "w") as f:
                json.dump({**config, "finetune": "full"}, f, indent=2, default=str)
            return
        state = {"unet." + k: v.contiguous() for k, v in lora_state_dict(unet).items()}
        save_file(state, os.path.join(tmp, WEIGHTS_NAME))
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)


def load_lora(unet, path: str) -> None:
    """Load a folder written by ``save_lora`` into a UNet that already has the same adapter."""
    state = load_file(os.path.join(path, WEIGHTS_NAME))
    load_lora_state_dict(unet, {k.removeprefix("unet."): v for k, v in state.items()})
