import importlib.util

import torch

from diffalign import _compat


def test_shim_is_idempotent_and_torchvision_imports():
    first = _compat.apply()
    assert _compat.apply() == first
    if importlib.util.find_spec("torchvision") is None:
        assert first == "absent"
        return
    assert first in ("native", "schemas")
    import torchvision.transforms.functional as TF  # raised "operator torchvision::nms does not exist" before

    x = torch.rand(1, 3, 40, 40, requires_grad=True)
    y = TF.resize(x, [20, 20], antialias=True)  # the differentiable resize reward models use
    y.sum().backward()
    assert y.shape == (1, 3, 20, 20) and x.grad is not None


def test_stack_imports_after_shim():
    import open_clip  # noqa: F401
    import peft  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401  (broken by the CUDA torchvision without the shim)
