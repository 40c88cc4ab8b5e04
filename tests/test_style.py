"""The code keeps the style pyproject.toml's ruff section states (line length 120, pyflakes, sorted imports)."""
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT


def test_ruff_passes():
    ruff = shutil.which("ruff") or shutil.which("ruff", path=sys.prefix + "/bin")
    if ruff is None:
        pytest.skip("ruff is not installed (it is in the test extra: pip install -e .[test])")
    proc = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", ROOT], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:]
