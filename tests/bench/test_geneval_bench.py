"""Issue 29's proxy-against-gold outputs: the paired gain of the gold metric (per-image fidelity) by hand, the
tiny-geneval presets, ``make geneval-bench``'s tables and README block on planted run folders, and the run curve
that draws the proxy beside the gold."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pandas as pd
import pytest

from bench.core.config import resolve
from bench.core.evaluate import paired_gain_in_se
from bench.outputs import plots
from bench.tools import geneval_bench as gb


def test_paired_gain_of_a_per_image_metric_by_hand():
    before = [1, 1, 0, 0, 1, 0]
    after = [1, 1, 1, 1, 0, 0]
    samples = [{"step": 0, "fidelity": float(v)} for v in before] + [{"step": 16, "fidelity": float(v)} for v in after]
    d = np.array(after, float) - np.array(before, float)  # 0 0 1 1 -1 0: mean 1/6
    want = d.mean() / (d.std(ddof=1) / math.sqrt(6))
    assert paired_gain_in_se(samples, "fidelity", 16) == pytest.approx(want)
    assert paired_gain_in_se(samples, "fidelity", 8) is None  # no evaluation at step 8
    old = [{"step": 0} for _ in before] + [{"step": 16, "fidelity": 1.0} for _ in after]  # a row without the key
    assert paired_gain_in_se(old, "fidelity", 16) is None
    same = [{"step": s, "fidelity": 1.0} for s in (0, 0, 16, 16)]
    assert paired_gain_in_se(same, "fidelity", 16) == 0.0


@pytest.mark.parametrize("method", gb.methods())
def test_every_geneval_preset_is_the_flow_world_on_tiny_geneval_without_eval_prompts_in_training(method):
    cfg = resolve(method, None, os.path.join(gb.PRESETS, f"{method}.yaml"))
    assert (cfg.reward, cfg.model, cfg.train_prompts, cfg.eval_prompts) == (
        "tiny-geneval", "models/tiny-flow", "tiny-geneval-train", "tiny-eval")
    assert cfg.eval.num_seeds == 32 and cfg.eval.every == cfg.steps  # evaluated at the start and the end
    assert set(gb.methods()) == {"flow-grpo", "flow-grpo-fast", "dance-grpo", "mix-grpo", "diffusion-nft",
                                 "alignprop", "ddpo-sf"}


def plant(root, method, seed, proxy, gold, proxy_se, gold_se, wall=100.0):
    path = os.path.join(root, f"{method}-seed{seed}")
    os.makedirs(path)
    summary = {"eval_reward_before": proxy[0], "eval_reward_after": proxy[1], "eval_reward_gain_in_se": 0.0,
               "eval_reward_gain_in_paired_se": proxy_se, "fidelity_before": gold[0], "fidelity_after": gold[1],
               "fidelity_gain_in_paired_se": gold_se, "wall_time_s": wall, "steps": 16}
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)
    with open(os.path.join(path, "config.yaml"), "w") as f:
        f.write("method: m\nreward: tiny-geneval\n")
    pd.DataFrame([{"step": 0, "kl_to_base": 0.0}, {"step": 1, "reward_mean": 0.5, "zero_spread_frac": 0.5},
                  {"step": 2, "reward_mean": 0.7, "zero_spread_frac": 1.0}, {"step": 3, "reward_mean": 0.9},
                  {"step": 16, "kl_to_base": 42.0, "reward_mean": 1.0}]).to_parquet(
        os.path.join(path, "metrics.parquet"))


def test_tables_and_the_readme_block_from_planted_runs(tmp_path, monkeypatch):
    root, doc, readme = tmp_path / "runs", tmp_path / "geneval.md", tmp_path / "README.md"
    monkeypatch.setattr(gb, "ROOT", str(root))
    monkeypatch.setattr(gb, "DOC", str(doc))
    monkeypatch.setattr(gb, "README", str(readme))
    readme.write_text(f"# x\n\n{gb.MARKERS[0]}\nold\n{gb.MARKERS[1]}\n\nafter\n")
    for seed, (g, s) in enumerate([(0.90, 1.0), (0.92, 2.0), (0.94, 3.0)]):  # gold gains 1, 2, 3 paired SE
        plant(root, "flow-grpo", seed, (0.89, g + 0.01), (0.90, g), s + 1.0, s)
    plant(root, "alignprop", 0, (0.89, 0.95), (0.90, 0.80), 4.0, -3.0)
    plant(root, "dance-grpo", 0, (0.89, 0.99), (0.90, 0.99), 5.0, 3.5)
    plant(root / "trials", "t", 0, (0.89, 0.88), (0.90, 0.86), -1.5, -1.9)
    with open(root / "trials" / "t-seed0" / "config.yaml", "a") as f:
        f.write("variant: flow-grpo/lr-trial\n")
    fid = [1.0] * 6 + [0.0] * 2  # the base fails 2 of 8: fixing both is +0.25 per image
    pd.DataFrame({"step": [0] * 8, "fidelity": fid}).to_parquet(root / "alignprop-seed0" / "eval_samples.parquet")
    gb.write(["flow-grpo", "alignprop", "dance-grpo", "mix-grpo"], [0, 1, 2])
    text = doc.read_text()
    row = next(ln for ln in text.splitlines() if ln.startswith("| flow-grpo | 3 |"))
    # mean ± SE over seeds: gold after 0.92 ± 0.0115, gold gain 2.0 ± 0.577, proxy gain 3.0 ± 0.577
    assert row == ("| flow-grpo | 3 | 0.930 ± 0.012 | 3.000 ± 0.577 | 0.920 ± 0.012 | 2.000 ± 0.577 | 0 of 3 | "
                   "100 ± 0 |")  # gold gains 1, 2, 3 SE: none more than 3
    assert "| alignprop | 1 | 0.950 | 4.000 | 0.800 | -3.000 | 0 of 1 | 100 |" in text
    assert "| base model | | 0.890 | | 0.900 | | | |" in text
    assert "| dance-grpo | 1 | 0.990 | 5.000 | 0.990 | 3.500 | 1 of 1 | 100 |" in text
    assert "| mix-grpo | 0 | not run (absent) | | | | | | | |" in text  # the every-run table names what is missing
    # the batch reward's first half (0.5, 0.7) -> second half (0.9, 1.0); zero-spread over the rounds logging it
    assert "| alignprop | 0 | 0.890 -> 0.950 | +4.0 | 0.900 -> 0.800 | -3.0 | 0.600 -> 0.950 | 0.75 | 42 | 100 |" \
        in text
    assert "| t-seed0 | `flow-grpo/lr-trial` | 16 | 0.890 -> 0.880 | -1.5 | 0.900 -> 0.860 | -1.9 | 100 |" in text
    best = 0.25 / (np.std([0.0] * 6 + [1.0] * 2, ddof=1) / np.sqrt(8))
    assert "fails the held-out judge on 2 of 8 eval images (gold 0.750)" in text and f"+{best:.1f} SE" in text
    r = readme.read_text()
    assert "\nold\n" not in r and r.endswith("after\n") and "| flow-grpo | 3 |" in r
    assert r.count(gb.MARKERS[0]) == 1 and r.count(gb.MARKERS[1]) == 1


def test_the_run_curve_draws_the_proxy_on_the_gold_axes(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setattr(plots.store, "save_figure", lambda fig, path, **k: seen.setdefault("fig", fig))
    df = pd.DataFrame({"step": [0, 1, 2], "reward_mean": [None, 0.9, 0.95], "eval_reward_mean": [0.89, None, 0.93],
                       "eval_reward_sem": [0.02, None, 0.02], "fidelity": [0.9, None, 0.91],
                       "fidelity_count": [0.9, None, 0.91]})
    for proxy in (None, "tiny-geneval"):
        seen.clear()
        plots.plot_run(df, str(tmp_path / "c.png"), proxy=proxy)
        labels = [t.get_text() for t in seen["fig"].axes[1].get_legend().get_texts()]
        assert ("proxy: tiny-geneval (trained on)" in labels) == (proxy is not None)
        assert ("gold: all" if proxy else "all") in labels
