"""Parity check, side 1 (isolated environment with the original ``image-reward`` 1.5 package).

Builds the package's own ``ImageReward`` model (BLIP ViT-L/16 + BERT-base, the real architecture) with random
weights, saves ``ImageReward.pt`` + ``med_config.json`` and a bert-base-uncased-shaped tokenizer into a
Hugging Face cache folder laid out as the Hub leaves it, loads the model back through the package's
``ImageReward.load(path, med_config=path)``, and scores every (prompt, image) pair two ways:

* ``score(prompt, image_path)``: the package's PIL path (what DPOK and the README use);
* ``score_gard(ids, mask, tensor)`` after ReFL's tensor Resize(224, bicubic) + CenterCrop(224) + Normalize,
  plus the gradient of that score with respect to the image for two images.

Writes ``original.json`` (scores, token ids, versions, timings) and ``original_grads.pt`` into ``--work``.
Run by ``parity/imagereward.sh``; needs HF_HUB_CACHE pointing at ``<work>/hub`` and HF_HUB_OFFLINE=1.
"""
import argparse
import importlib.util
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The registry's torchvision is a CUDA build; the project's shim makes it import beside the CPU torch.
_spec = importlib.util.spec_from_file_location("diffalign_compat", os.path.join(ROOT, "diffalign", "_compat.py"))
_compat = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_compat)
_compat.apply()

import torch  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, HERE)
import imagereward_inputs as inputs  # noqa: E402

# med_config.json as published in THUDM/ImageReward (BLIP's BERT-base config; BLIP overrides encoder_width)
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
    "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072,
    "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "model_type": "bert", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30524, "encoder_width": 768,
    "add_cross_attention": True,
}


def randomise(model, seed):
    """Perturb every tensor so that each one (biases, LayerNorms, the head) affects the score."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name or name.endswith(("norm1.weight", "norm2.weight", "norm.weight")):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.startswith("mlp.layers.") and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.time()
    hub = os.environ["HF_HUB_CACHE"]
    staging = os.path.join(args.work, "staging")
    os.makedirs(staging, exist_ok=True)
    torch.manual_seed(args.seed)

    inputs.write_vocab(staging)
    inputs.hf_cache_put(hub, "bert-base-uncased", {f: os.path.join(staging, f)
                                                   for f in ("vocab.txt", "tokenizer_config.json")})
    images = inputs.write_images(os.path.join(args.work, "images"), seed=args.seed)
    with open(os.path.join(staging, "med_config.json"), "w") as f:
        json.dump(MED_CONFIG, f, indent=2)

    import ImageReward as RM
    from ImageReward.ImageReward import ImageReward as PackageModel
    from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
    t_import = time.time()

    model = PackageModel(med_config=os.path.join(staging, "med_config.json"), device="cpu")
    randomise(model, args.seed)
    state = model.state_dict()
    torch.save(state, os.path.join(staging, "ImageReward.pt"))
    n_params = sum(p.numel() for p in model.parameters())
    del model
    snap = inputs.hf_cache_put(hub, "THUDM/ImageReward", {f: os.path.join(staging, f)
                                                          for f in ("ImageReward.pt", "med_config.json")})
    t_build = time.time()

    # the package's own loader (strict=False there: check by hand that every tensor arrived)
    rm = RM.load(os.path.join(snap, "ImageReward.pt"), device="cpu", med_config=os.path.join(snap, "med_config.json"))
    loaded = rm.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state), "load lost tensors"
    t_load = time.time()

    refl = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224),
                    Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    pil_scores, refl_scores, ids, masks = [], [], [], []
    with torch.no_grad():
        for prompt, path in zip(inputs.PROMPTS, images):
            pil_scores.append(rm.score(prompt, path))
            tok = rm.blip.tokenizer(prompt, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
            x = ToTensor()(Image.open(path).convert("RGB"))[None]
            refl_scores.append(rm.score_gard(tok.input_ids, tok.attention_mask, refl(x)).item())
            ids.append(tok.input_ids[0].tolist())
            masks.append(tok.attention_mask[0].tolist())
    t_score = time.time()

    grads = []
    for i in (2, 5):  # a downsampled portrait and an upsampled image
        tok = rm.blip.tokenizer(inputs.PROMPTS[i], padding="max_length", truncation=True, max_length=35,
                                return_tensors="pt")
        x = ToTensor()(Image.open(images[i]).convert("RGB"))[None].requires_grad_(True)
        rm.score_gard(tok.input_ids, tok.attention_mask, refl(x)).sum().backward()
        grads.append(x.grad[0])
    torch.save({"index": [2, 5], "grads": grads}, os.path.join(args.work, "original_grads.pt"))
    t_grad = time.time()

    import timm
    import transformers

    out = {
        "pil": pil_scores, "refl": refl_scores, "input_ids": ids, "attention_mask": masks,
        "images": images, "prompts": inputs.PROMPTS, "parameters": n_params, "state_dict_entries": len(state),
        "versions": {"image-reward": "1.5", "transformers": transformers.__version__, "timm": timm.__version__,
                     "torch": torch.__version__},
        "seconds": {"import": round(t_import - t0, 1), "build_and_save": round(t_build - t_import, 1),
                    "package_load": round(t_load - t_build, 1), "score": round(t_score - t_load, 1),
                    "gradients": round(t_grad - t_score, 1), "total": round(time.time() - t0, 1)},
    }
    with open(os.path.join(args.work, "original.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(f"original image-reward 1.5: {len(pil_scores)} pairs scored, {n_params / 1e6:.1f} M parameters, "
          f"{len(state)} state-dict entries; {out['seconds']}")


if __name__ == "__main__":
    main()
