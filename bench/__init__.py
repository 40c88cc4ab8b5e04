"""DiffAlign: a benchmark harness for aligning text-to-image diffusion models."""
from bench import _compat

_compat.apply()

__version__ = "0.1.0"
