"""The comparison tools' reading of a run (bench/outputs/compare.py): the win rate against the base model recovered
from the per-image eval scores of a run written before the harness logged it."""
import pandas as pd
import pytest

from bench.outputs.compare import with_win_rate


def test_win_rate_from_eval_samples_matches_the_harness_rule():
    samples = pd.DataFrame({"step": [0, 0, 0, 0, 5, 5, 5, 5], "prompt": ["a", "a", "b", "b"] * 2,
                            "seed": [0, 1, 0, 1] * 2, "reward": [1.0, 2.0, 3.0, 4.0, 1.5, 2.0, 2.0, 5.0]})
    df = pd.DataFrame({"step": [0, 1, 5], "eval_reward_mean": [2.5, None, 2.625]})
    out = with_win_rate(df, samples)
    assert out["win_rate"].iloc[0] == 0.5 and pd.isna(out["win_rate"].iloc[1])
    assert out["win_rate"].iloc[2] == pytest.approx((1 + 0.5 + 0 + 1) / 4)  # a win, a tie, a loss, a win
    repeated = samples.assign(prompt="a")
    assert "win_rate" not in with_win_rate(df, repeated)  # images that cannot be matched: nothing made up
