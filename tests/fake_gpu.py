"""A stand-in GPU on a machine without one: tensors that live in CPU memory but say they are on another device.

``FakeGPU`` is a ``TorchDispatchMode``.  Inside it, a tensor moved to the ``meta`` device (``x.to("meta")``, a module's
``.to("meta")``, a factory called with ``device="meta"``) becomes an ``OnFakeGPU``: a wrapper whose ``.device`` is
``meta`` and whose values are a real CPU tensor, so a whole run computes its real numbers.  Every aten call is then
checked the way the CUDA backend checks it:

- an op mixing a tensor on the stand-in device with a CPU tensor of one or more dimensions raises (CUDA accepts a
  0-dim CPU tensor as a scalar, so this does too; and CPU index tensors into a GPU tensor, ``index`` / ``index_put``);
- a random op drawing for the stand-in device from a CPU generator raises (CUDA wants a CUDA generator);
- ``.numpy()`` of a tensor on the stand-in device raises (a CUDA tensor must be copied to the CPU first).

What it cannot catch: a CUDA-only API called directly (``torch.cuda.*``), a device *type* test (``x.device.type ==
"cuda"``: here the type is ``meta``), work on the wrong device that never meets the other device's tensors (slow, not
wrong), host-device synchronisations (``.item()`` works here as on a GPU), and anything kernel-specific (dtype support,
numerics).  Data crosses ``.to()`` / ``.cpu()`` as on a GPU; ``copy_`` between the devices is allowed, as on a GPU.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

DEVICE = torch.device("meta")  # the stand-in GPU's device as the code under test sees it
aten = torch.ops.aten
MAY_MIX = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default,
           aten.index_put.default, aten._index_put_impl_.default, aten.lift_fresh.default, aten.detach.default,
           aten._local_scalar_dense.default, aten.set_.source_Tensor}


class WrongDevice(RuntimeError):
    """What CUDA would have raised: tensors on two devices in one op."""


class OnFakeGPU(torch.Tensor):
    """A CPU tensor (``elem``) seen by the code under test as a tensor on the stand-in device."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor, requires_grad: bool = False):
        r = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                layout=elem.layout, device=DEVICE, requires_grad=requires_grad)
        r.elem = elem
        return r

    def __repr__(self):
        return f"OnFakeGPU({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise WrongDevice(f"{func} on a stand-in GPU tensor outside FakeGPU()")

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert a GPU tensor to numpy: use Tensor.cpu() first (stand-in GPU)")


def _is_target(device) -> bool:
    return device is not None and torch.device(device).type == DEVICE.type


class FakeGPU(TorchDispatchMode):
    """The mode; ``calls`` counts the aten calls that touched the stand-in device."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        gpu, cpu = [], []

        def unwrap(x):
            if isinstance(x, OnFakeGPU):
                gpu.append(x)
                return x.elem
            if isinstance(x, torch.Tensor):
                if x.device.type == DEVICE.type:
                    raise RuntimeError(f"a data-less {DEVICE} tensor reached {func}: a way onto the device this "
                                       "harness does not intercept")
                cpu.append(x)
            return x

        uargs, ukwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        to_gpu = _is_target(ukwargs.get("device"))
        to_cpu = not to_gpu and ukwargs.get("device") is not None
        if to_gpu:
            ukwargs["device"] = torch.device("cpu")
        if gpu or to_gpu:
            self.calls += 1
            if gpu and func not in MAY_MIX:
                bad = [t for t in cpu if t.dim() > 0]
                if bad:
                    raise WrongDevice(f"Expected all tensors to be on the same device, but found at least two "
                                      f"devices, cuda (stand-in) and cpu! ({func}, a CPU tensor of shape "
                                      f"{tuple(bad[0].shape)})")
            gen = ukwargs.get("generator")
            if gen is not None and gen.device.type == "cpu":
                raise WrongDevice(f"Expected a 'cuda' device type for generator but found 'cpu' ({func})")
        out = func(*uargs, **ukwargs)
        if not (gpu or to_gpu) or to_cpu:
            return out
        by_elem = {id(x.elem): x for x in gpu}  # an in-place op returns its own argument

        def wrap(t):
            if not isinstance(t, torch.Tensor):
                return t
            same = by_elem.get(id(t))
            return OnFakeGPU(t) if same is None else same
        return tree_map(wrap, out)


class _DataFactories(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` builds its tensor below the dispatcher's Python key; build it on the CPU
    and move it, so the move is seen."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.tensor, torch.as_tensor, torch.asarray) and _is_target(kwargs.get("device")):
            kwargs["device"] = torch.device("cpu")
            return func(*args, **kwargs).to(DEVICE)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_gpu():
    """Inside: ``.to("meta")`` moves to the stand-in GPU (modules keep their Parameter objects)."""
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        with _DataFactories(), FakeGPU() as mode:
            yield mode
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
