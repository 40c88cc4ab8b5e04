"""DiffAlign's harness: ``diffalign run|list|sweep|compare|table|report|regress|leaderboard`` (or ``python -m bench``).

It sits on top: it imports the ground floor (``diffalign``), the methods, the rewards and the prompt sets, and
nothing below imports it.  Its folders, by role:

    cli.py       the command line (``diffalign`` / ``python -m bench``)
    drivers/     many runs: ``sweep``, ``leaderboard``, and ``regress`` (CI's regression of reward curves)
    core/        one run: config and schema, the method's context, evaluation, the run loop, caches, trackers
    outputs/     figures, tables and HTML pages drawn from the results store (nothing there runs a model)
    tinyworld/   the tiny world's judge and the recipes that build the committed files under ``models/``
    tools/       hand-run measurements: ``perf``, ``gpu_check``, ``pg_diagnostics``, ``base_quality``

Imports run downwards only: cli -> drivers -> core -> outputs, tinyworld; tools use core.
"""
import diffalign  # noqa: F401  (applies the torchvision shim first)

__version__ = diffalign.__version__
