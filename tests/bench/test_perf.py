"""make perf (bench/tools/perf.py) on the small pipeline, so it cannot rot: the parts add up to the step, the floor
counts the passes the method made, and the timing wrappers leave nothing behind."""
from conftest import small_run_args

from bench.core.context import GuardedOptimizer
from bench.tools import perf


def test_one_measurement_adds_up_and_counts_the_methods_passes(small_pixel_pipeline_dir, tmp_path):
    step_before = GuardedOptimizer.step
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + ["reward=saturation", "alignprop.batch_size=2",
                                                                 "eval.metrics=[tiny-clip]"]
    r = perf.measure("alignprop", args, steps=2)
    assert GuardedOptimizer.step is step_before  # the class-level wrapper is undone
    parts = r["parts_s"]
    assert set(parts) == set(perf.PARTS) and all(v >= 0 for v in parts.values())
    assert abs(sum(parts.values()) - r["step_s"]) < 1e-6 or parts["other"] == 0
    assert r["unet_fwd_per_step"] == 2 * 2 * 2  # 2 DDIM steps x batch 2 x CFG
    assert r["unet_call_batch"] == 4 and r["floor_s"] > 0 and r["ratio"] > 0.5
    assert r["images_per_step"] == 2 and r["peak_mem_mb"] > 0
    md = perf.markdown({"date": "today", "machine": "m", "threads": 2, "steps": 2, "methods": [r], "scaling": {}})
    assert "| alignprop | tiny world |" not in md and "| alignprop |" in md  # a random small pixel pipeline


def test_the_floor_counts_ogdms_discriminator(small_pixel_pipeline_dir, tmp_path):
    """OGDM's floor holds its discriminator's passes: per step, the generator's adversarial term and the
    discriminator's update on real and fake, each a forward + backward (3), replayed alone and added to the UNet's."""
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + ["judge=null", "eval.metrics=[]",
                                                                 "ogdm.batch_size=4", "ogdm.data=tiny-world"]
    r = perf.measure("ogdm", args, steps=2)
    d = r["other_networks"]["disc"]
    assert d["forward_backward_per_step"] == 3 and d["forward_per_step"] == 0
    assert d["forward_backward_s"] > d["forward_s"] > 0
    assert r["floor_s"] == r["floor_unet_s"] + d["floor_s"] and d["floor_s"] == 3 * d["forward_backward_s"]
