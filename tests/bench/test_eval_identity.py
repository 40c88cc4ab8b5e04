"""The evaluation's numbers, bit for bit, against values recorded before it was batched across prompts
(tests/data/eval_reference.json: the committed tiny world, AlignProp's preset eval with FD at NFE 2 and 10, the base
model and a perturbed LoRA).  Batching, text embeddings computed once, the KL trajectories in one call and the KL of
the base model taken as 0 must change no number.  The recording is exact on the machine kind that made it (its CPU
capability is stored); elsewhere the kernels differ, so there the check is to 1e-5 relative."""
import json
import os

import pytest
import torch

from bench.config import resolve
from bench.evaluate import Evaluator
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from rewards import get_reward

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "eval_reference.json")


@pytest.mark.slow
def test_the_evaluation_gives_the_recorded_numbers():
    ref = json.load(open(REFERENCE))
    cfg = resolve("alignprop", ref["overrides"])
    pipe = load_pipeline(cfg.model)
    params = add_lora(pipe.unet, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets, cfg.lora.init, seed=0)
    ev = Evaluator(cfg, get_reward(cfg.reward))
    first = ev(pipe, 0, None, final=False, base_model_itself=True)
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    second = ev(pipe, 10, [s["reward"] for s in first.samples], final=True)
    exact = torch.backends.cpu.get_cpu_capability() == ref["cpu_capability"] and torch.get_num_threads() == 2

    def same(a, b):
        return a == b if exact else a == pytest.approx(b, rel=1e-5, abs=1e-7)

    for got, want in ((first, ref["step0"]), (second, ref["step10"])):
        assert set(got.metrics) == set(want["metrics"])
        for k, v in want["metrics"].items():
            assert same(got.metrics[k], v), (k, got.metrics[k], v)
        assert all(same(s["reward"], r) for s, r in zip(got.samples, want["rewards"]))
    assert same(float(second.images.double().sum()), ref["step10"]["image_sum"])
