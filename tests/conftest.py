"""Shared fixtures and helpers.  Importing diffalign first applies the torchvision shim (before transformers/peft)."""
import json
import os
import subprocess
import sys

import accelerate
import pandas as pd
import pytest
import torch
from diffusers import DDIMScheduler

import diffalign  # noqa: F401  (the torchvision shim, before anything imports transformers or peft)
from bench import cli
from bench.core import run
from bench.core.config import resolve
from bench.core.context import Context
from bench.tinyworld import models as tiny_models
from diffalign.costs import Costs
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_UNET = dict(
    sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=64, norm_num_groups=8, attention_head_dim=8,
)
VOLATILE = ["wall_time", "peak_mem_mb"]  # metrics columns that differ between identical runs
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="session")
def small_pixel_pipeline_dir(tmp_path_factory):
    """A random-weight pixel-space pipeline (8x8 images) in the diffusers folder layout."""
    comps = tiny_models.build_components(seed=0, unet_config=SMALL_UNET)
    path = str(tmp_path_factory.mktemp("pipe") / "small-pixel")
    tiny_models.save_pipeline(comps, path)
    return path


@pytest.fixture(scope="session")
def flow_pipeline_dir(tmp_path_factory):
    """A tiny random-weight flow folder: the tiny world's networks with a FlowMatchEulerDiscreteScheduler."""
    comps = tiny_models.build_components(seed=0, objective="flow")
    path = str(tmp_path_factory.mktemp("flow") / "tiny-random-flow")
    tiny_models.save_pipeline(comps, path)
    return path


@pytest.fixture()
def small_pixel_pipeline(small_pixel_pipeline_dir):
    return load_pipeline(small_pixel_pipeline_dir)


# The every-method matrices (the GPU path without a GPU, mixed precision, data parallel) run one representative name
# per method file in `make test`; the other names of a shared file (ddpo-sf beside ddpo, three of the four GRPO
# presets) differ from it only in config, and run in CI's `make test-matrix` (marked ``matrix``).  For GRPO the
# representative is mix-grpo: its sliding window drives the mixed SDE/ODE sampler and the window schedule, the most
# general of the four paths.
REPRESENTATIVE = {"ddpo": "ddpo", "ddpo-sf": "ddpo", "flow-grpo": "mix-grpo", "flow-grpo-fast": "mix-grpo",
                  "dance-grpo": "mix-grpo", "mix-grpo": "mix-grpo"}


def representative(name: str) -> bool:
    """Whether ``name`` runs in `make test`'s every-method matrices (the representative of its method file)."""
    return REPRESENTATIVE.get(name, name) == name


def every_method(names):
    """``names`` as pytest params: the representatives plain, the rest marked ``matrix`` (CI: make test-matrix)."""
    return [name if representative(name) else pytest.param(name, marks=pytest.mark.matrix) for name in sorted(names)]


@pytest.fixture(scope="session", autouse=True)
def _threads():
    """Two threads on 2 cores; one each when pytest-xdist runs the suite on two workers (make test: -n 2)."""
    torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)


@pytest.fixture(scope="session", autouse=True)
def _eval_cache(tmp_path_factory):
    """The step-0 evaluation cache of the test session: its own folder (not the checkout's results/cache)."""
    os.environ["DIFFALIGN_EVAL_CACHE"] = str(tmp_path_factory.mktemp("eval0-cache"))


def method_context(cfg, pipe, params, reward, prompts=PROMPTS, seed: int = 0) -> Context:
    """The Context a method gets from the harness, built by hand around a resolved config and a pipeline."""
    return Context(cfg=cfg, pipe=pipe, reward=reward, train_prompts=list(prompts),
                   generator=torch.Generator().manual_seed(seed), costs=Costs(),
                   accelerator=accelerate.Accelerator(cpu=True), trainable=params)


class LinearReward:
    """R(x) = <w, x>: a differentiable reward whose gradient is known."""
    name, differentiable = "linear", True

    def __init__(self, shape, dtype):
        self.w = torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=dtype)

    def __call__(self, images, prompts):
        return (images * self.w).flatten(1).sum(1)


def leading_lora_context(pipe_dir, method, overrides, dtype=torch.float32, reward=None, prompts=PROMPTS):
    """A Context on the small pipeline with a LoRA whose B matrices are non-zero, leading spacing (trailing's
    t = 999 first step puts x0 clipping kinks inside finite differences)."""
    cfg = resolve(method, ["model=x"] + overrides)
    pipe = load_pipeline(pipe_dir, dtype=dtype)
    pipe.scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "timestep_spacing": "leading",
                                                "steps_offset": 1})
    params = add_lora(pipe.unet, 2, 2.0, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in params:
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return method_context(cfg, pipe, params, reward or LinearReward((3, 8, 8), dtype), prompts)


def metrics_of(run_dir: str) -> pd.DataFrame:
    return pd.read_parquet(os.path.join(run_dir, "metrics.parquet"))


def run_killed_and_resumed(method: str, args: list[str], tmp_path) -> tuple[str, str]:
    """Run ``method`` once whole, and once in another process killed (SIGKILL) after step 3's update but
    before its checkpoint, then resumed; returns (whole run folder, killed-and-resumed run folder)."""
    full, killed = str(tmp_path / "full"), str(tmp_path / "killed")
    run.start(resolve(method, args), full)
    env = dict(os.environ, **{run.CRASH_ENV: "3"})
    cmd = [sys.executable, "-m", "bench", "run", "--method", method, "--out", killed] + args
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 137, proc.stderr[-2000:]
    assert json.load(open(os.path.join(killed, "manifest.json")))["status"] == "running"
    assert metrics_of(killed)["step"].max() == 2  # step 3 lost with the kill
    assert cli.main(["run", "--resume", killed]) == 0
    return full, killed


def assert_resumes_to_the_same_run(method: str, args: list[str], tmp_path) -> tuple[pd.DataFrame, dict]:
    """A run killed with SIGKILL after step 3 and resumed ends with the metrics of an uninterrupted one; returns
    those metrics (volatile columns dropped) and the resumed run's manifest."""
    full, killed = run_killed_and_resumed(method, args, tmp_path)
    a, b = metrics_of(full).drop(columns=VOLATILE), metrics_of(killed).drop(columns=VOLATILE)
    pd.testing.assert_frame_equal(a, b)  # same seed, another process, killed and resumed: the same run
    manifest = json.load(open(os.path.join(killed, "manifest.json")))
    assert manifest["status"] == "complete" and manifest["resumes"][0]["from_step"] == 2
    return a, manifest


def error_line(capsys, argv: list[str]) -> str:
    """The CLI's one ``error:`` line for bad input (exit status 2), checked to be the only one."""
    code = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def small_run_args(pipe_dir: str, tmp_path) -> list[str]:
    """A run of a few seconds on the small pipeline: 4 steps, 2 eval prompts x 2 seeds, 2 DDIM steps."""
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    return [f"model={pipe_dir}", f"eval_prompts={prompts}", "steps=4", "checkpoint_every=2", "eval.every=2",
            "eval.grid_every=2", "eval.num_seeds=2", "eval.num_steps=2", "sampler.num_steps=2", "threads=2"]


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: a second thread buys nothing on a busy 2-core machine; the suite's count is restored after
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_flow_folders(tmp_path_factory):
    """Random-weight SD3- and FLUX-shaped folders (diffalign.flow_models), built once for the session."""
    from diffalign import flow_models

    root = tmp_path_factory.mktemp("flow-models")
    return {flow_models.SD3: flow_models.make_tiny_sd3_folder(root / "tiny-sd3", seed=0),
            flow_models.FLUX: flow_models.make_tiny_flux_folder(root / "tiny-flux", seed=1)}
