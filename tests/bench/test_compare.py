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


def _run(method, reward, seed, variant="v", images_per_step=8):
    from bench.outputs.compare import RunData

    steps = [0, 2, 4]
    df = pd.DataFrame({"step": steps, "images": [s * images_per_step for s in steps],
                       "eval_reward_mean": [1.0 + 0.1 * s + 0.01 * seed for s in steps]})
    cfg = {"method": method, "reward": reward, "seed": seed, "variant": variant}
    return RunData(f"/nowhere/{method}-{reward}-{seed}", cfg, df, {"status": "complete"}, None)


def test_each_method_has_its_own_colour_and_each_variant_its_own_line():
    from bench.outputs.compare import METHOD_ORDER, method_style

    colours = [method_style(m)["color"] for m in METHOD_ORDER]
    assert len(set(colours)) == len(colours)  # 9 methods, 9 colours (11 legend entries were in similar blues)
    a, b = method_style("alignprop", 0), method_style("alignprop", 1)
    assert a["color"] == b["color"] and (a["linestyle"], a["marker"]) != (b["linestyle"], b["marker"])
    assert method_style("my-method", 0, ("my-method",))["color"] not in colours  # a new method: a new colour


def test_runs_on_several_rewards_get_a_panel_each_a_warning_and_a_legend_inside(tmp_path, capsys, monkeypatch):
    from bench.outputs import compare

    runs = [_run(m, r, s) for m in ("ddpo", "dpok") for r in ("saturation", "tiny-aesthetic") for s in (0, 1)]
    runs.append(_run("ogdm", "saturation", 0, images_per_step=0))  # generates no images: a vertical line, said so
    assert compare.warn_mixed_rewards(runs) == ["saturation", "tiny-aesthetic"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "saturation, tiny-aesthetic" in err[0] and err[0].startswith("warning:")
    saved = []
    monkeypatch.setattr(compare, "save_figure", lambda fig, path, **kw: saved.append((fig, path, kw)))
    compare.plot_metrics(runs, ["eval_reward_mean"], "images", str(tmp_path / "one.png"))
    fig, _, kw = saved[-1]
    assert kw.get("bbox_inches") == "tight"  # the legend under the panels is inside the saved image
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["trained on saturation", "trained on tiny-aesthetic"]
    assert len(panels[0].get_legend_handles_labels()[1]) == 3 and len(panels[1].get_legend_handles_labels()[1]) == 2
    labels = fig.legends[0].get_texts()
    assert any("ogdm" in t.get_text() and "images generated: 0 at every step" in t.get_text() for t in labels)
    paths = compare.plot_curves(runs, ["eval_reward_mean"], "images", str(tmp_path))
    assert {p.rsplit("/", 1)[1] for p in paths} == {f"{r}__eval_reward_mean__images.{e}" for r in
                                                    ("saturation", "tiny-aesthetic") for e in ("png", "svg")}
    assert all(kw.get("bbox_inches") == "tight" for _, _, kw in saved)
    assert sorted(f.axes[0].get_title() for f, p, _ in saved[1:] if p.endswith(".png")) == [
        "eval_reward_mean, trained on saturation", "eval_reward_mean, trained on tiny-aesthetic"]
