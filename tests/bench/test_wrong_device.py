"""Every method's step, sampling and evaluation with the model on another device than the CPU, without a GPU.

The harness builds the run on the stand-in GPU of ``tests/fake_gpu.py`` (the accelerator's device is ``meta``; every
tensor moved there keeps its real values in CPU memory), evaluates the base model, makes one ``step()`` and evaluates
again, with the whole CUDA device discipline checked on every aten call: an op that meets a CPU tensor of one or more
dimensions beside a model-device tensor raises, as CUDA does.  So a timestep, noise, embedding, index or reward tensor
left on the CPU where the model's device is needed fails here; the first defect of issue 26 (DDPO's and DPOK's 1-D
timesteps, left on the CPU) failed it in the time embedding's ``addmm`` before its fix.

What it cannot catch is listed in ``tests/fake_gpu.py``: CUDA-only calls, tests of ``device.type == "cuda"``,
host-device synchronisations, and anything kernel-specific (dtypes, numerics).  The stand-in device is ``meta`` to the
code under test, not ``cuda``.
"""
from unittest import mock

import accelerate
import pytest
import torch
from conftest import every_method
from fake_gpu import DEVICE, WrongDevice, fake_gpu

from bench.core import run
from bench.core.config import resolve, short_overrides
from diffalign.pipeline import Pipeline
from diffalign.sampling import guided_eps
from diffalign.store import RunFolder
from methods import METHODS


def on_the_stand_in_gpu(method: str, tmp_path):
    """The run (built, not started) with its accelerator's device the stand-in GPU; call inside ``fake_gpu()``."""
    prompts = tmp_path / "eval.txt"
    prompts.write_text("a red circle\ntwo blue squares\n")
    cfg = resolve(method, short_overrides(method, [f"eval_prompts={prompts}", "sampler.num_steps=4",
                                                   "eval.num_steps=4", "threads=2"]))
    with mock.patch.object(accelerate.Accelerator, "device", new_callable=mock.PropertyMock, return_value=DEVICE):
        return run.Run(cfg, RunFolder(str(tmp_path / "run")))


@pytest.mark.slow
@pytest.mark.parametrize("method", every_method(METHODS))
def test_a_step_and_its_evaluations_keep_every_tensor_on_the_model_device(method, tmp_path):
    with fake_gpu() as mode:
        r = on_the_stand_in_gpu(method, tmp_path)
        pipe = r.ctx.pipe
        assert pipe.device == DEVICE and all(p.device == DEVICE for p in r.ctx.trainable)
        before = r.evaluator(pipe, 0, None, final=False, base_model_itself=True)
        r.ctx.step = 1
        metrics = r.method.step()
        after = r.evaluator(pipe, 1, [s["reward"] for s in before.samples], final=True)
        assert mode.calls > 1000  # the model's work really ran on the stand-in device
        assert all(torch.isfinite(torch.tensor(float(v))) for k, v in metrics.items() if k.startswith("reward"))
        assert torch.isfinite(torch.tensor(after.metrics["eval_reward_mean"])) and after.images.device.type == "cpu"
        # planted: the prompt embeddings left on the CPU must fail the step, whatever the method does with them
        encode = Pipeline.encode_prompts
        with mock.patch.object(Pipeline, "encode_prompts", lambda self, p: encode(self, p).cpu()):
            with pytest.raises(WrongDevice, match="same device"):
                r.method.step()


def test_a_1d_timestep_on_the_cpu_fails_where_a_0d_one_passes(small_pixel_pipeline):
    """The defect as it was: diffusers moves a 0-d timestep to the model's device but builds the embedding of a 1-d
    one on that tensor's own device, so the time-embedding layer meets a CPU tensor."""
    with fake_gpu():
        pipe = small_pixel_pipeline.to(DEVICE)
        x = torch.randn(2, 3, 8, 8).to(DEVICE)
        cond = pipe.encode_prompts(["a red circle", "two blue squares"])
        assert guided_eps(pipe.unet, x, torch.tensor(500), cond, None, 1.0).device == DEVICE
        assert guided_eps(pipe.unet, x, torch.tensor([500, 400]).to(DEVICE), cond, None, 1.0).device == DEVICE
        with pytest.raises(WrongDevice, match="addmm"):
            guided_eps(pipe.unet, x, torch.tensor([500, 400]), cond, None, 1.0)
