"""Parity check, side 2 (the project's environment): our ``rewards.imagereward`` on the files and inputs that
``imagereward_original.py`` wrote, compared with the original package's scores.

Loads through the registry with no arguments (``get_reward("imagereward")``), i.e. the way a run does: the
files are found in the Hugging Face cache that side 1 filled (HF_HUB_CACHE), nothing is downloaded.
Checks, over every (prompt, image) pair:

* token ids and attention masks equal the package's (bert-base-uncased tokenizer + [DEC]/[ENC], 35 tokens);
* ``preprocess="pil"`` scores vs the package's ``score(prompt, image)``;
* the default differentiable scores vs the package's ``score_gard`` after ReFL's tensor transforms;
* a batched call equals the per-image calls;
* d score / d image vs the package's, relative to the gradient's size.

Exits non-zero unless every score differs by less than --tol (1e-4) and the gradients agree to 1e-3 relative.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import diffalign  # noqa: E402,F401  (applies the torchvision shim first)
from rewards import get_reward  # noqa: E402
from rewards.imagereward import ImageReward  # noqa: E402


def load_image(path: str) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1], the same values torchvision's ToTensor gives."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    t0 = time.time()
    with open(os.path.join(args.work, "original.json")) as f:
        orig = json.load(f)
    prompts, paths = orig["prompts"], orig["images"]

    reward = get_reward("imagereward")  # default construction: finds the files in the HF cache
    pil = ImageReward(preprocess="pil")
    t_load = time.time()

    ids, mask = reward.tokenize(prompts)
    ids_equal = ids.tolist() == orig["input_ids"] and mask.tolist() == orig["attention_mask"]

    images = [load_image(p) for p in paths]
    with torch.no_grad():
        ours_pil = [pil(x, [p]).item() for x, p in zip(images, prompts)]
        ours_refl = [reward(x, [p]).item() for x, p in zip(images, prompts)]
        same = [i for i, x in enumerate(images) if x.shape[-2:] == images[0].shape[-2:]]
        batched = reward(torch.cat([images[i] for i in same]), [prompts[i] for i in same])
    batch_diff = max(abs(batched[j].item() - ours_refl[i]) for j, i in enumerate(same))
    t_score = time.time()

    saved = torch.load(os.path.join(args.work, "original_grads.pt"), weights_only=True)
    grad_rel = 0.0
    for i, g_orig in zip(saved["index"], saved["grads"]):
        x = images[i].clone().requires_grad_(True)
        reward(x, [prompts[i]]).sum().backward()
        grad_rel = max(grad_rel, ((x.grad[0] - g_orig).abs().max() / g_orig.abs().max()).item())
    t_grad = time.time()

    d_pil = [abs(a - b) for a, b in zip(ours_pil, orig["pil"])]
    d_refl = [abs(a - b) for a, b in zip(ours_refl, orig["refl"])]
    print(f"{'pair':>4}  {'size':>9}  {'package score()':>15}  {'ours (pil)':>11}  {'package score_gard':>18}  "
          f"{'ours (tensor)':>13}")
    for i, (x, p) in enumerate(zip(images, prompts)):
        size = "x".join(map(str, x.shape[-2:]))
        print(f"{i:>4}  {size:>9}  {orig['pil'][i]:>15.6f}  {ours_pil[i]:>11.6f}  {orig['refl'][i]:>18.6f}  "
              f"{ours_refl[i]:>13.6f}   {p[:40]!r}")
    result = {
        "pairs": len(prompts), "max_abs_diff_pil": max(d_pil), "max_abs_diff_tensor": max(d_refl),
        "max_abs_diff_batched": batch_diff, "grad_max_rel_diff": grad_rel, "token_ids_equal": ids_equal,
        "score_spread": float(np.std(orig["pil"])), "tolerance": args.tol, "files": list(reward.files),
        "original": {"versions": orig["versions"], "seconds": orig["seconds"], "parameters": orig["parameters"],
                     "state_dict_entries": orig["state_dict_entries"]},
        "ours_seconds": {"load": round(t_load - t0, 1), "score": round(t_score - t_load, 1),
                         "gradients": round(t_grad - t_score, 1)},
    }
    ok = (ids_equal and max(d_pil) < args.tol and max(d_refl) < args.tol and batch_diff < args.tol
          and grad_rel < 1e-3 and len(prompts) >= 8)
    result["passed"] = ok
    with open(os.path.join(args.work, "parity.json"), "w") as f:
        json.dump(result, f, indent=1)
    print(f"imagereward parity {'PASSED' if ok else 'FAILED'}: {len(prompts)} pairs, max |diff| "
          f"{max(d_pil):.2e} (package score() vs ours, PIL path), {max(d_refl):.2e} (score_gard vs ours, tensor "
          f"path), batched {batch_diff:.1e}; gradient max rel diff {grad_rel:.1e}; token ids equal: {ids_equal}; "
          f"score spread (std) {result['score_spread']:.3f}; tolerance {args.tol:g}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
