"""DiffAlign's harness: ``python -m bench run|list|sweep|compare|table|report|regress``.

It sits on top: it imports the ground floor (``diffalign``), the methods, the rewards and the prompt sets,
and nothing below imports it.  ``bench/outputs/`` draws figures and tables from the store;
``bench/tinyworld/`` holds the tiny world's judge and the recipes that build ``models/``.
"""
import diffalign  # noqa: F401  (applies the torchvision shim first)

__version__ = diffalign.__version__
