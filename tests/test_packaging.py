"""Packaging (docs/packaging.md): what the wheel holds (its top-level names, the tiny world's weights, presets,
protocols, sweep files, prompt files, the ``diffalign`` console script), and the installed package at work in another
folder: ``diffalign run --method alignprop --quick`` finds the tiny world inside the package, writes its run under the
working folder's results/ and its step-0 evaluation under the user cache, and nothing into site-packages.

The wheel is built from a copy of the sources (a build in the checkout would leave build/ there) without build
isolation; the installed package runs in a virtual environment of the base interpreter whose dependencies come from
this project's environment through a .pth line (a folder added that way has none of its own .pth files run, so the
editable finder that maps this checkout stays off) and whose own site-packages, searched first, holds the wheel."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["pyproject.toml", "README.md", "diffalign", "bench", "methods", "rewards", "prompts", "models"]
TOP_LEVEL = {"bench", "diffalign", "methods", "prompts", "rewards"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", ".tmp-*", ".old-*", "*.state.pt", ".lock")
    for name in SOURCES:
        path = os.path.join(ROOT, name)
        if os.path.isdir(path):
            shutil.copytree(path, src / name, ignore=skip)
        else:
            shutil.copy(path, src / name)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (found,) = os.listdir(tmp / "dist")
    return str(tmp / "dist" / found)


def _data_files(folder: str, patterns=("",)) -> list[str]:
    out = []
    for d, dirs, files in os.walk(os.path.join(ROOT, folder)):
        dirs[:] = [x for x in dirs if x != "__pycache__"]
        out += [os.path.relpath(os.path.join(d, f), ROOT) for f in files
                if f.endswith(patterns) and not f.endswith((".py", ".pyc", ".state.pt")) and not f.startswith(".")]
    return sorted(out)


def test_the_wheel_holds_the_code_the_tiny_world_and_every_data_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {n.split("/")[0] for n in names} == TOP_LEVEL | {"diffalign-0.1.0.dist-info"}
    models = _data_files("models")
    assert len(models) >= 19 and all("diffalign/" + m in names for m in models), sorted(
        m for m in models if "diffalign/" + m not in names)
    data = [f for d in ("bench/presets", "bench/protocols", "bench/sweeps") for f in _data_files(d, (".yaml",))]
    data += _data_files("prompts", (".txt",))
    assert data and all(f in names for f in data), [f for f in data if f not in names]
    entry_points = zipfile.ZipFile(wheel).read("diffalign-0.1.0.dist-info/entry_points.txt").decode()
    assert "[console_scripts]\ndiffalign = bench.cli:main" in entry_points


def _installed(wheel: str, venv) -> tuple[str, str]:
    """A virtual environment holding the wheel (dependencies from this project's environment): (its python, its
    site-packages)."""
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "_diffalign_test_deps.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel], check=True,
                   capture_output=True, timeout=300)
    return python, site


def _files(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, dirs, files in os.walk(folder) for f in files
            if "__pycache__" not in d}


@pytest.mark.slow
def test_the_installed_diffalign_command_runs_from_another_folder(wheel, tmp_path):
    python, site = _installed(wheel, tmp_path / "venv")
    work, cache = tmp_path / "work", tmp_path / "cache"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFALIGN_EVAL_CACHE")}
    env["DIFFALIGN_CACHE"] = str(cache)
    where = subprocess.run([python, "-c", "import bench, methods, diffalign.store as s; "
                            "print(bench.__file__, methods.__file__, s.PROJECT_ROOT, s.IN_CHECKOUT)"],
                           cwd=work, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(p.startswith(site) for p in where[:3]) and where[3] == "False", where  # not the checkout
    before = _files(site)
    proc = subprocess.run([str(tmp_path / "venv" / "bin" / "diffalign"), "run", "--method", "alignprop", "--quick"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (name,) = os.listdir(work / "results" / "runs")
    assert name.startswith("alignprop-tiny-aesthetic-seed0-") and name.endswith("-quick")
    assert proc.stdout.strip().endswith(f"results in {os.path.join('results', 'runs', name)}")
    assert os.path.isfile(work / "results" / "runs" / name / "summary.json") and os.listdir(work) == ["results"]
    assert len(os.listdir(cache / "eval0")) == 1  # the step-0 evaluation: in the user cache
    assert _files(site) == before  # nothing written into site-packages
    listing = subprocess.run([python, "-m", "bench", "list"], cwd=work, env=env, capture_output=True, text=True)
    assert listing.returncode == 0 and "prompt sets: eval-simple-animals" in listing.stdout
