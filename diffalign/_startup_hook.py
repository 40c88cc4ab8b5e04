"""A startup hook of the project's virtual environment: the torchvision shim (``diffalign._compat``) applied before
any process of the environment imports torchvision, not only processes that import the project first.

``make setup`` copies this file into the environment's site-packages as ``diffalign_startup_hook.py`` and adds
``diffalign_startup_hook.pth`` (one line, ``import diffalign_startup_hook``), which Python runs at every start.  It
only puts a finder at the front of ``sys.meta_path``: nothing is imported at start-up (no torch, no project code).
The first time anything imports ``torchvision``, the finder takes itself out and imports ``diffalign`` (whose import
applies the shim), then lets the normal import go on.  What needs it: third-party command-line tools that import
torchvision through transformers before any project code runs, such as ``accelerate launch`` (its CLI fails with
``RuntimeError: operator torchvision::nms does not exist`` in the CPU environment without it).
"""
import importlib.abc
import sys


class _ShimBeforeTorchvision(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        try:
            import diffalign  # noqa: F401  (its import applies the torchvision shim)
        except ImportError:  # the project is not importable from here: leave torchvision as it is
            pass
        return None  # the normal finders import torchvision


if not any(isinstance(f, _ShimBeforeTorchvision) for f in sys.meta_path):
    sys.meta_path.insert(0, _ShimBeforeTorchvision())
