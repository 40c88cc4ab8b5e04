"""``make flow-bench``'s tables (bench/tools/flow_world.py) on planted run folders: the straight-line crossing of
3 SE against a hand computation, the mean ± SE over seeds on both worlds, and which methods get a 'why' line."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from bench.tools import flow_world as fw


def plant(root, method, seed, world, evals, *, gain_se, paired_se=5.0, steps=30, train_s=60.0, eval_s=10.0, kl=100.0):
    path = os.path.join(root, f"{method}-seed{seed}") if world == "flow" else os.path.join(root, world,
                                                                                            f"{method}-seed{seed}")
    os.makedirs(path)
    before, after = evals[0][1], evals[-1][1]
    summary = {"eval_reward_before": before, "eval_reward_after": after, "eval_reward_gain_in_se": gain_se,
               "eval_reward_gain_in_paired_se": paired_se, "fidelity_before": 0.9, "fidelity_after": 0.8,
               "steps": steps, "wall_time_s": train_s + eval_s, "train_time_s": train_s, "eval_time_s": eval_s}
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write("method: m\nreward: saturation\n")
    rows = [{"step": s, "eval_reward_mean": m, "eval_reward_sem": e, "kl_to_base": kl if s else 0.0,
             "reward_mean": 1.0 + 0.01 * s, "reward_std": 0.5, "images": 16.0, "grad_norm": 2.0}
            for s, m, e in evals]
    pd.DataFrame(rows).to_parquet(os.path.join(path, "metrics.parquet"))
    return path


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(fw, "ROOT", str(tmp_path))
    return str(tmp_path)


def test_crossing_is_the_least_squares_line_reaching_3_se(root):
    # evals (step, mean, sem): the least-squares slope through (0, 1.0), (10, 1.3), (20, 1.4) is 0.02 per step
    path = plant(root, "a", 0, "flow", [(0, 1.0, 0.3), (10, 1.3, 0.3), (20, 1.4, 0.4)], gain_se=0.8, steps=20)
    steps, seconds = fw.crossing(path)
    se = np.hypot(0.3, 0.4)  # 0.5
    assert steps == pytest.approx(3 * se / 0.02)  # 75 steps
    assert seconds == pytest.approx(75 * 60.0 / 20 + 10.0)
    falling = plant(root, "b", 0, "flow", [(0, 1.0, 0.3), (20, 0.9, 0.3)], gain_se=-0.2)
    assert fw.crossing(falling) is None


def test_seeds_table_and_why(root):
    for seed, g in enumerate([1.0, 2.0, 3.0]):
        plant(root, "a", seed, "flow", [(0, 1.0, 0.1), (30, 1.0 + g, 0.1)], gain_se=g * 7)
        plant(root, "a", seed, "ddpm", [(0, 1.0, 0.1), (30, 1.0 + 2 * g, 0.1)], gain_se=g * 14, kl=1000.0)
    plant(root, "b", 0, "flow", [(0, 1.0, 0.3), (30, 1.3, 0.3)], gain_se=0.7, paired_se=4.0)
    text = fw.seeds_table(["a", "b"], [0, 1, 2])
    flow = next(ln for ln in text.splitlines() if ln.startswith("| a (saturation) | flow"))
    ddpm = next(ln for ln in text.splitlines() if ln.startswith("| a (saturation) | ddpm"))
    assert "| 3 | 2.000 ± 0.577 | 14.000 ± 4.041 |" in flow  # mean and SE over seeds of the gain and of its SE
    assert "| 3 | 4.000 ± 1.155 |" in ddpm
    assert "| b " not in text  # one seed on one world: not in the over-seeds table
    why = fw.why(["a", "b"])
    assert "**a**" not in why  # gained 7 SE: no line
    line = next(ln for ln in why.splitlines() if ln.startswith("- **b**"))
    assert "paired gain +4.0 SE (unpaired +0.7)" in line and "KL to base 100" in line
    assert "would reach 3 SE at step 127" in line  # slope 0.3 / 30 steps, SE hypot(0.3, 0.3): 3 x 0.424 / 0.01
