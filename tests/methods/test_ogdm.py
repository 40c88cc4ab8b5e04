"""OGDM (methods/ogdm.py): gamma = 0 is plain fine-tuning to the last bit, the adversarial term trains D and changes
G's update, the companion baseline and the FD-against-NFE table, full fine-tuning, a killed run resumed, bad input."""
import json
import os

import pandas as pd
import pytest
import torch
from conftest import PROMPTS, assert_resumes_to_the_same_run, error_line, method_context, small_run_args

from bench.core import run
from bench.core.config import resolve
from diffalign.ddim import add_noise
from diffalign.images import images_to_x0
from diffalign.lora import add_lora
from diffalign.pipeline import load_pipeline
from diffalign.realdata import load_real_data
from methods import ogdm
from rewards import get_reward


def _context(pipe_dir, overrides, seed=0):
    cfg = resolve("ogdm", ["model=x", "reward=saturation", "ogdm.batch_size=4", f"seed={seed}"] + overrides)
    pipe = load_pipeline(pipe_dir)
    return method_context(cfg, pipe, add_lora(pipe.unet, 4, 4.0, seed=0), get_reward("saturation"), seed=seed)


def test_gamma_zero_is_plain_fine_tuning_to_the_last_bit(small_pixel_pipeline_dir):
    steps, lr = 3, 3e-3
    ctx = _context(small_pixel_pipeline_dir, ["ogdm.gamma=0", f"ogdm.lr={lr}"])
    method = ogdm.Method(ctx)
    assert not hasattr(method, "disc")  # nothing adversarial is built
    for _ in range(steps):
        method.step()
    # the same by hand: the denoising loss on the same data stream, AdamW, clipping
    pipe = load_pipeline(small_pixel_pipeline_dir)
    params = add_lora(pipe.unet, 4, 4.0, seed=0)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    gen, data = torch.Generator().manual_seed(0), load_real_data("tiny-world", PROMPTS)
    for _ in range(steps):
        captions, images = data.draw(4, gen)
        drop = torch.rand(4, generator=gen) < 0.1
        captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        x0 = images_to_x0(pipe, images)
        t = torch.randint(0, 1000, (4,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        pred = pipe.unet(add_noise(pipe.scheduler, x0, t, eps), t, encoder_hidden_states=pipe.encode_prompts(captions),
                         return_dict=False)[0]
        (pred - eps).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
    for a, b in zip(ctx.trainable, params):
        assert torch.equal(a, b)  # the same parameters after N steps, bit for bit
    assert ctx.costs.unet_fwd == ctx.costs.unet_bwd == steps * 4 and ctx.costs.images == 0


def test_the_adversarial_term_trains_d_and_changes_the_generators_update(small_pixel_pipeline_dir):
    plain = _context(small_pixel_pipeline_dir, ["ogdm.gamma=0"])
    adv = _context(small_pixel_pipeline_dir, ["ogdm.gamma=1.0"])
    m_plain, m_adv = ogdm.Method(plain), ogdm.Method(adv)
    d_before = [p.detach().clone() for p in m_adv.disc.parameters()]
    out_plain, out = m_plain.step(), m_adv.step()
    assert out["loss_dm"] == pytest.approx(out_plain["loss_dm"], rel=1e-6)  # same batch, t and noise
    assert out["loss"] == pytest.approx(out["loss_dm"] + out["loss_adv"], rel=1e-5)
    assert 0 <= out["mean_s"] <= 200 and out["r1"] >= 0 and out["real_images"] == 4
    assert any(not torch.equal(a, b) for a, b in zip(d_before, m_adv.disc.parameters()))  # D stepped
    assert any(not torch.equal(a, b) for a, b in zip(plain.trainable, adv.trainable))  # the term moved G


def test_full_fine_tuning_trains_every_weight_and_keeps_the_base_as_reference(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + ["finetune=full", "steps=2", "reward=saturation",
                                                                 "eval.metrics=[tiny-clip]", "ogdm.batch_size=4"]
    cfg = resolve("ogdm", args)
    assert cfg.variant.endswith("/full-finetune")
    out = str(tmp_path / "full")
    run.start(cfg, out)
    saved = os.listdir(os.path.join(out, "lora"))
    assert "diffusion_pytorch_model.safetensors" in saved and "finetune.json" in saved
    metrics = pd.read_parquet(os.path.join(out, "metrics.parquet"))
    assert metrics["kl_to_base"].iloc[-1] > 0  # the reference is the frozen base, not the trained UNet
    from diffalign.lora import make_full_finetune, reference

    pipe, fresh = load_pipeline(small_pixel_pipeline_dir), load_pipeline(small_pixel_pipeline_dir)
    params = make_full_finetune(pipe.unet)
    assert sum(p.numel() for p in params) == sum(p.numel() for p in fresh.unet.parameters())
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
        x, c = torch.randn(2, 3, 8, 8), fresh.encode_prompts(PROMPTS)
        with reference(pipe.unet) as ref:
            ours = ref(x, 5, encoder_hidden_states=c).sample
            assert torch.equal(ours, fresh.unet(x, 5, encoder_hidden_states=c).sample)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_metrics(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "ogdm.batch_size=4", "ogdm.gamma=0.5", "reward=saturation", "eval.metrics=[tiny-clip]"]
    a, manifest = assert_resumes_to_the_same_run("ogdm", args, tmp_path)
    assert manifest["variant"].startswith("ogdm/adm-ddim/gamma-0.5/k-0.2/hinge")
    assert (a["loss_d"].iloc[1:] > 0).all() and a["real_images"].iloc[-1] == 16


@pytest.mark.slow
def test_companion_baseline_and_the_fd_against_nfe_table(small_pixel_pipeline_dir, tmp_path):
    args = small_run_args(small_pixel_pipeline_dir, tmp_path) + [
        "steps=2", "ogdm.batch_size=4", "ogdm.baseline_run=true", "reward=saturation",
        "eval.metrics=[fd]", "eval.fd.nfe=[1,2]", "eval.fd.real_per_prompt=4", "eval.every=2"]
    out = str(tmp_path / "with-baseline")
    _, summary = run.start(resolve("ogdm", args), out)
    base = os.path.join(out, "baseline")
    assert json.load(open(os.path.join(base, "manifest.json")))["status"] == "complete"
    assert json.load(open(os.path.join(base, "manifest.json")))["eval0"].startswith("cache ")  # step 0 reused
    assert summary["baseline"]["variant"].startswith("ogdm/adm-ddim/gamma-0(denoising loss only)")
    table = pd.read_csv(os.path.join(out, "fd_nfe.csv"))
    assert list(table["model"])[0] == "base model" and len(table) == 3
    assert list(table.columns)[2:] == ["nfe_1", "nfe_2"]
    assert (table[["nfe_1", "nfe_2"]] > 0).all().all() and os.path.isfile(os.path.join(out, "fd_nfe.png"))
    main = pd.read_parquet(os.path.join(out, "metrics.parquet"))
    assert main["fd_nfe2"].notna().sum() == 2  # at the first and the last evaluation
    # a rerun of the finished folder only rewrites the table; the baseline is not run again
    mtime = os.path.getmtime(os.path.join(base, "metrics.parquet"))
    run.resume(out)
    assert os.path.getmtime(os.path.join(base, "metrics.parquet")) == mtime


def test_bad_input_gives_one_clear_line(capsys, tmp_path, small_pixel_pipeline_dir):
    base = ["run", "--out", str(tmp_path / "run"), "--set", f"model={small_pixel_pipeline_dir}", "--method", "ogdm"]
    cases = [
        (["ogdm.adv_loss=wgan"], "'ogdm.adv_loss' = 'wgan'; accepted: hinge, logistic"),
        ([f"ogdm.data={tmp_path / 'nowhere'}"], "does not exist; accepted: tiny-world (the renderer), a folder"),
        (["ogdm.gamma=-1"], "'ogdm.gamma' = -1.0; accepted: a finite number in [0, 1e+06]"),
        (["ogdm.k=2"], "'ogdm.k' = 2.0; accepted: a finite number in [0, 1]"),
        (["eval.metrics=[fd]", "eval.fd.nfe=[0]"], "'eval.fd.nfe' = [0]; accepted: a non-empty list of distinct"),
        (["eval.metrics=[fd]", "eval.fd.features=vgg"], "'eval.fd.features' = 'vgg'; accepted: auto, tiny-clip"),
        (["eval.metrics=[fd]", "eval.fd.real=/no/such"], "eval.fd.real = '/no/such' does not exist"),
        (["finetune=half"], "config key 'finetune' = 'half'; accepted: lora, full"),
    ]
    for extra, expected in cases:
        assert expected in error_line(capsys, base + extra), extra
    assert not os.path.exists(tmp_path / "run")
