"""Compatibility shim for the registry's torchvision next to the CPU build of torch.

The only torchvision that matches torch 2.13.0 on the package registry is a CUDA build.  Beside the
CPU torch its compiled ``_C.so`` cannot load (it links ``libtorch_cuda.so``), and torchvision then
fails at import with ``RuntimeError: operator torchvision::nms does not exist``, because
``torchvision/_meta_registrations.py`` registers fake kernels for operators that were never defined.
transformers, peft and open_clip all import torchvision when it is installed, so that one error
breaks the whole stack.

``apply()`` fixes this without importing torchvision:

1. find the installed torchvision package (``importlib.util.find_spec``); if there is none, do nothing;
2. try to load its real operators (``torch.ops.load_library(<pkg>/_C.so)``); if that works (a CUDA
   torch, or a matching CPU torchvision), leave torchvision alone;
3. otherwise define just the operator *schemas* ``torchvision::nms`` and ``torchvision::qnms`` in a
   ``torch.library`` fragment, so the fake registrations succeed.  Only ``torchvision.ops`` kernels
   (nms, roi_align, ...) remain unavailable; nothing in this suite needs them.

It is idempotent and must run before anything imports torchvision, transformers, peft or open_clip:
``diffalign/__init__.py`` calls it first, so every import of the project applies it.
"""
from __future__ import annotations

import importlib.util
import os

import torch

_STATE: dict[str, object] = {"applied": False, "mode": None, "library": None}


def apply() -> str | None:
    """Make ``import torchvision`` work; return what was done ("absent", "native" or "schemas")."""
    if _STATE["applied"]:
        return _STATE["mode"]  # type: ignore[return-value]
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        mode = "absent"
    else:
        pkg_dir = list(spec.submodule_search_locations)[0]
        so_path = next((os.path.join(pkg_dir, f) for f in sorted(os.listdir(pkg_dir))
                        if f.startswith("_C") and f.endswith((".so", ".pyd"))), None)
        try:
            if so_path is None:
                raise OSError("no compiled torchvision operators found")
            torch.ops.load_library(so_path)
            mode = "native"
        except (OSError, RuntimeError):
            if _has_op("nms"):
                mode = "native"
            else:
                lib = torch.library.Library("torchvision", "DEF")  # kept alive in _STATE
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                _STATE["library"] = lib
                mode = "schemas"
    _STATE["applied"] = True
    _STATE["mode"] = mode
    return mode


def _has_op(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False
