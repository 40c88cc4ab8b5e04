"""``make gpu-check`` (``python -m bench.tools.gpu_check``): what one GPU does with a Stable Diffusion 1.5-sized model.

A random-weight pipeline with SD 1.5's architecture (the UNet, CLIP ViT-L/14 text encoder and VAE shapes of the
published configs, 512 px images, 64x64 latents; built from configs and saved by diffusers, nothing downloaded) is
loaded through the suite's own loader and run by the harness's own ``Run`` (frozen weights in bf16, LoRA in fp32):

1. ``matmul``: an 8192^3 bf16 matrix product, the rate this GPU actually reaches (mean of 10 after 3 warm-ups);
2. ``alignprop``: AlignProp with K = 1 (``last_k``, fixed) at batch 1, 2 and 4, 50 DDIM steps, CFG 7.5, reward
   ``saturation``: seconds per optimizer step, images per second, peak memory (``torch.cuda.max_memory_allocated``
   from the loading of the model to the last timed step);
3. ``ddpo``: DDPO (importance sampling) at batch 8, 50 DDIM steps, eta 1, CFG 5, every step trained: the sampling
   phase and the training phase of one round, separately; the UNet samples at CFG batch 2 x 8 and recomputes at
   2 x 4 (two minibatches, one update), so ``ratio_dev_first`` says whether this GPU's bf16 kernels give the same
   log-probs at both batch sizes;
4. ``unet``: one UNet forward + backward (gradients to the LoRA weights, as every method takes them) at batch 8
   (a CFG pair of 4), its FLOPs counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions, matrix
   products, attention), the achieved FLOP/s, and that as a fraction of the GPU's dense bf16 peak (datasheet) and of
   the matrix product's rate measured in 1;
5. ``tiny_world``: every method of the suite on the tiny world on this GPU, in float32 and in bf16, as the harness
   runs it (its own ``Run``): the base model's evaluation, two steps and a final evaluation, so each method's CUDA
   path (sampling, step, evaluation) has run; per method and precision the second step's seconds, the peak memory
   from the model's loading on, and ``ratio_dev_first``, max |rho - 1| at the first inner step before any update,
   which stays at 1 within float32 rounding only if the recomputed log-probs equal the sampled ones (DDPO, DPOK, RLR;
   rlr-code's PPO terms follow its first-order update, so its value is not 0 by design).

Results go to ``<out>/gpu_check.json`` (written after every section, so a run stopped by its time limit keeps what it
measured) and ``<out>/gpu_check.md``.  ``--tiny`` runs sections 2-4 on the CPU with a small random latent pipeline and
a few DDIM steps, and section 5 for two methods on the CPU (the test suite does, so this script cannot rot); its numbers
say nothing about a GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

from bench.core.config import resolve, short_overrides
from bench.core.run import Run
from diffalign.errors import BenchError
from diffalign.store import PROJECT_ROOT, RunFolder, atomic_write_json, atomic_write_text
from methods import METHODS as METHOD_NAMES

# Dense bf16 tensor-core peaks from the vendors' datasheets (FLOP/s, without sparsity), by device-name substring;
# the first match wins.
BF16_PEAK = [("H100 PCIe", 756e12), ("H100", 989.4e12), ("H200", 989.4e12), ("A100", 312e12), ("L40S", 362e12),
             ("A10G", 70e12)]
PRECISIONS = ("no", "bf16")  # the tiny-world section's: float32 and bf16
TINY_METHODS = ("ddpo", "rlr")  # the CPU tiny mode's tiny-world section

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215)
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1)

# the full check and the CPU tiny mode: DDIM steps, AlignProp batches, DDPO batch, timed steps per setting
FULL = dict(num_steps=50, alignprop_batches=[1, 2, 4], ddpo_batch=8, unet_batch=8, timed=2)
TINY = dict(num_steps=4, alignprop_batches=[1, 2], ddpo_batch=4, unet_batch=4, timed=1)


def sd15_pipeline(path: str, device: str) -> str:
    """SD 1.5's architecture with random weights, saved by diffusers in the folder layout the loader reads.  The
    tokenizer is the tiny world's word-level one with SD's 77-token context (ids index SD's 49,408-row table)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bench.tinyworld import models as tiny_models

    tokenizer = tiny_models.build_tokenizer()
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it is fast (860 M UNet weights)
        comps = {"unet": UNet2DConditionModel(**SD15_UNET),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                                              **SD15_TEXT)),
                 "vae": AutoencoderKL(**SD15_VAE)}
    comps.update(tokenizer=tokenizer, scheduler=DDIMScheduler(**SD15_SCHEDULER))
    tiny_models.save_pipeline(comps, path)
    return path


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None


def bf16_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK if k in name), None)


def matmul_rate(device: str) -> dict:
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    s = (time.perf_counter() - t0) / 10
    return {"n": n, "seconds": s, "flops_per_s": 2 * n ** 3 / s}


def build_run(method: str, overrides: list[str], tmp: str) -> Run:
    """The harness's own run object, nothing evaluated or written (as ``bench.tools.perf`` builds one)."""
    cfg = resolve(method, overrides)
    run = Run(cfg, RunFolder(os.path.join(tmp, f"{method}-{len(os.listdir(tmp))}")))
    os.makedirs(run.folder.path)
    run.first_eval, run.t0 = {}, time.time()
    return run


def common(model: str, device: str, num_steps: int, guidance: float, eta: float) -> list[str]:
    return [f"model={model}", "judge=null", "reward=saturation", "eval.kl_seeds=0", "eval.metrics=[]",
            f"device={device}", "mixed_precision=" + ("bf16" if device == "cuda" else "'no'"),
            f"sampler.num_steps={num_steps}", f"sampler.guidance={guidance}", f"sampler.eta={eta}"]


def fresh(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def check_alignprop(model: str, device: str, size: dict, tmp: str) -> list[dict]:
    rows = []
    for b in size["alignprop_batches"]:
        fresh(device)
        run = build_run("alignprop", common(model, device, size["num_steps"], 7.5, 0.0) + [
            "alignprop.truncation=last_k", "alignprop.k_dist=fixed", "alignprop.k=1", f"alignprop.batch_size={b}"],
            tmp)
        run.method.step()  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for _ in range(size["timed"]):
            m = run.method.step()
        sync(device)
        s = (time.perf_counter() - t0) / size["timed"]
        rows.append({"batch": b, "step_s": s, "images_per_s": b / s, "peak_mem_mb": peak_mb(device),
                     "grad_steps": m["grad_steps"], "variant": run.cfg.variant})
        del run
    return rows


def check_ddpo(model: str, device: str, size: dict, tmp: str) -> dict:
    fresh(device)
    b = size["ddpo_batch"]
    run = build_run("ddpo", common(model, device, size["num_steps"], 5.0, 1.0) + [
        f"ddpo.samples_per_step={b}", f"ddpo.sample_batch_size={b}", f"ddpo.train_batch_size={b // 2}",
        "ddpo.grad_accum=2", "ddpo.timestep_fraction=1.0", "ddpo.skip_first_steps=0", "ddpo.skip_last_steps=0"], tmp)
    collect, spent = run.method.collect, []

    def timed_collect():
        sync(device)
        t0 = time.perf_counter()
        out = collect()
        sync(device)
        spent.append(time.perf_counter() - t0)
        return out

    run.method.collect = timed_collect
    with run.ctx.accelerator.autocast():
        devs = [run.method.step()["ratio_dev_first"]]  # warm-up
        spent.clear()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(size["timed"]):
            devs.append(run.method.step()["ratio_dev_first"])
        sync(device)
    total = (time.perf_counter() - t0) / size["timed"]
    sampling = sum(spent) / len(spent)
    return {"batch": b, "variant": run.cfg.variant, "sampling_s": sampling, "training_s": total - sampling,
            "round_s": total, "sampling_images_per_s": b / sampling, "peak_mem_mb": peak_mb(device),
            "train_batch": b // 2, "dtype": str(run.ctx.pipe.dtype), "ratio_dev_first_max": max(devs)}


def check_unet(model: str, device: str, size: dict, tmp: str, matmul: dict | None) -> dict:
    """One UNet forward + backward to the LoRA weights, timed, its FLOPs counted."""
    from torch.utils.flop_counter import FlopCounterMode

    fresh(device)
    run = build_run("alignprop", common(model, device, size["num_steps"], 7.5, 0.0), tmp)
    pipe, b = run.ctx.pipe, size["unet_batch"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((b, *pipe.latent_shape), generator=g).to(device, pipe.dtype)
    t = torch.randint(0, 1000, (b,), generator=g).to(device)
    cond = pipe.encode_prompts(["a red circle on a blue square"] * b)

    def fwd_bwd():
        pipe.unet(x, t, encoder_hidden_states=cond).sample.float().pow(2).mean().backward()
        for p in run.ctx.trainable:
            p.grad = None

    with FlopCounterMode(display=False) as counter:
        with torch.no_grad():
            pipe.unet(x, t, encoder_hidden_states=cond)
    flops_forward = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        fwd_bwd()
    flops = counter.get_total_flops()
    for _ in range(2):
        fwd_bwd()
    reps = size["timed"] * 3
    sync(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        fwd_bwd()
    sync(device)
    s = (time.perf_counter() - t0) / reps
    name = torch.cuda.get_device_name() if device == "cuda" else platform.machine()
    peak = bf16_peak(name) if device == "cuda" else None
    return {"batch": b, "seconds": s, "flops": flops, "flops_forward": flops_forward, "flops_per_s": flops / s,
            "fraction_of_bf16_peak": flops / s / peak if peak else None, "bf16_peak_flops_per_s": peak,
            "fraction_of_measured_matmul": flops / s / matmul["flops_per_s"] if matmul else None}


def tiny_world_row(method: str, precision: str, device: str, tmp: str, extra: list[str]) -> dict:
    """One method in one precision on the tiny world: the base model's evaluation, two steps (the second timed), and
    a final evaluation."""
    fresh(device)
    sets = ["eval.num_seeds=2", f"device={device}"] + ([f"mixed_precision={precision}"] if precision != "no" else [])
    run = build_run(method, short_overrides(method, sets + extra), tmp)
    pipe = run.ctx.pipe
    base = run.evaluator(pipe, 0, None, final=False, base_model_itself=True)
    steps = []
    with run.ctx.accelerator.autocast():
        for i in (1, 2):
            run.ctx.step = i
            sync(device)
            t0 = time.perf_counter()
            metrics = run.method.step()
            sync(device)
            steps.append((time.perf_counter() - t0, metrics))
    final = run.evaluator(pipe, 2, [e["reward"] for e in base.samples], final=True)
    first = steps[0][1]
    return {"method": method, "precision": precision, "dtype": str(pipe.dtype), "step_s": steps[1][0],
            "first_step_s": steps[0][0], "peak_mem_mb": peak_mb(device),
            "ratio_dev_first": first.get("ratio_dev_first"), "skipped_updates": run.ctx.skipped_updates,
            "scaler_skips": run.ctx.scaler_skips,
            "eval_reward": [base.metrics["eval_reward_mean"], final.metrics["eval_reward_mean"]],
            "variant": run.cfg.variant}


def check_tiny_world(tmp: str, device: str, methods, precisions=PRECISIONS, extra: list[str] | None = None,
                     save=lambda rows: None) -> list[dict]:
    """Every method in every precision (``tiny_world_row``); a failure is recorded and the others go on."""
    rows = []
    for method in methods:
        for precision in precisions:
            try:
                rows.append(tiny_world_row(method, precision, device, tmp, list(extra or [])))
            except Exception as e:
                traceback.print_exc()
                rows.append({"method": method, "precision": precision, "error": f"{type(e).__name__}: {e}"[:300]})
            save(rows)
    return rows


def markdown(r: dict) -> str:
    lines = ["# `make gpu-check`", "",
             f"{r['date']}, {r['device_name']}, torch {r['torch']}, commit {r.get('commit') or '?'}; "
             f"{r['mode']} mode, {r['size']['num_steps']} DDIM steps; bench/tools/gpu_check.py says what each row "
             "is.", ""]
    failed = {k: v["error"] for k, v in r.items() if isinstance(v, dict) and "error" in v}
    r = {k: (None if k in failed else v) for k, v in r.items()}
    lines += [f"{k}: failed ({e})." for k, e in failed.items()] + ([""] if failed else [])
    if r.get("matmul"):
        lines += [f"bf16 matrix product ({r['matmul']['n']}^3): {r['matmul']['flops_per_s'] / 1e12:.0f} TFLOP/s.", ""]
    if r.get("alignprop"):
        lines += ["| AlignProp K = 1 | s / step | images / s | peak memory (GB) |", "| --- | --- | --- | --- |"]
        for a in r["alignprop"]:
            mem = f"{a['peak_mem_mb'] / 1024:.1f}" if a["peak_mem_mb"] is not None else "-"
            lines.append(f"| batch {a['batch']} | {a['step_s']:.2f} | {a['images_per_s']:.2f} | {mem} |")
        lines.append("")
    if r.get("ddpo"):
        d = r["ddpo"]
        mem = f"{d['peak_mem_mb'] / 1024:.1f} GB" if d["peak_mem_mb"] is not None else "-"
        lines += [f"DDPO ({d['variant']}) at batch {d['batch']}: sampling {d['sampling_s']:.2f} s "
                  f"({d['sampling_images_per_s']:.2f} images / s), training {d['training_s']:.2f} s, "
                  f"peak memory {mem}; {d['dtype']}, sampled at batch {d['batch']} and recomputed at "
                  f"{d['train_batch']}: max |rho - 1| at the first inner step {d['ratio_dev_first_max']:.1e}.", ""]
    if r.get("unet"):
        u = r["unet"]
        frac = (f", {100 * u['fraction_of_bf16_peak']:.0f} % of the bf16 peak "
                f"({u['bf16_peak_flops_per_s'] / 1e12:.0f} TFLOP/s, datasheet)") if u["fraction_of_bf16_peak"] else ""
        meas = (f", {100 * u['fraction_of_measured_matmul']:.0f} % of the measured matrix-product rate"
                if u["fraction_of_measured_matmul"] else "")
        lines += [f"UNet forward + backward (LoRA gradients) at batch {u['batch']}: {u['seconds'] * 1e3:.1f} ms, "
                  f"{u['flops'] / 1e9:,.0f} GFLOP (forward alone {u['flops_forward'] / 1e9:,.0f}), "
                  f"{u['flops_per_s'] / 1e12:.2f} TFLOP/s{frac}{meas}.", ""]
    if r.get("tiny_world"):
        lines += [f"Tiny world on {r['device_name']}: the base model's evaluation, 2 steps, a final evaluation, per "
                  "method and precision (no = float32).  rho dev = max |rho - 1| at the first inner step, before any "
                  "update.", "",
                  "| method | precision | s / step | peak memory (MB) | rho dev | eval reward (base -> after) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for t in r["tiny_world"]:
            if "error" in t:
                lines.append(f"| {t['method']} | {t['precision']} | failed: {t['error'][:120]} | | | |")
                continue
            mem = f"{t['peak_mem_mb']:.0f}" if t["peak_mem_mb"] is not None else "-"
            dev = f"{t['ratio_dev_first']:.1e}" if t["ratio_dev_first"] is not None else "-"
            lines.append(f"| {t['method']} | {t['precision']} | {t['step_s']:.3f} | {mem} | {dev} | "
                         f"{t['eval_reward'][0]:.4f} -> {t['eval_reward'][1]:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU tiny mode (small latent pipeline, few steps)")
    p.add_argument("--out", default="docs", help="folder for gpu_check.json and gpu_check.md")
    p.add_argument("--cache", default=os.path.join(PROJECT_ROOT, "results", "cache"),
                   help="where the random-weight pipeline is saved")
    p.add_argument("--commit", help="the commit measured (default: git's HEAD here)")
    p.add_argument("--skip", nargs="*", default=[],
                   help="sections to leave out: matmul alignprop ddpo unet tiny_world")
    a = p.parse_args(argv)
    device = "cpu" if a.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("make gpu-check needs a CUDA GPU and none is visible; accepted without one: "
                         "python -m bench.tools.gpu_check --tiny (the CPU tiny mode the test suite runs)")
    from bench.core.run import git_commit
    from bench.tools.perf import latent_pipeline

    size = TINY if a.tiny else FULL
    report = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "mode": "tiny" if a.tiny else "full", "size": size, "torch": torch.__version__,
              "device_name": torch.cuda.get_device_name() if device == "cuda" else platform.machine(),
              "commit": a.commit or git_commit()["commit"], "seconds": {}}
    os.makedirs(a.out, exist_ok=True)

    def save():
        atomic_write_json(os.path.join(a.out, "gpu_check.json"), report)
        atomic_write_text(os.path.join(a.out, "gpu_check.md"), markdown(report))

    t_start = time.time()
    t0 = time.time()
    model = (latent_pipeline(os.path.join(a.cache, "perf-latent-sd")) if a.tiny
             else sd15_pipeline(os.path.join(a.cache, "gpu-check-sd15"), device))
    report["seconds"]["pipeline"] = time.time() - t0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        sections = [("matmul", lambda: None if a.tiny else matmul_rate(device)),
                    ("alignprop", lambda: check_alignprop(model, device, size, tmp)),
                    ("ddpo", lambda: check_ddpo(model, device, size, tmp)),
                    ("unet", lambda: check_unet(model, device, size, tmp, report.get("matmul"))),
                    ("tiny_world", lambda: check_tiny_world(
                        tmp, device, TINY_METHODS if a.tiny else sorted(METHOD_NAMES),
                        extra=["sampler.num_steps=4", "eval.num_steps=4"] if a.tiny else [],
                        save=lambda rows: (report.__setitem__("tiny_world", rows), save())))]
        for name, fn in sections:
            if name in a.skip:
                continue
            t0 = time.time()
            try:
                report[name] = fn()
            except Exception as e:  # one section failing must not cost the others (a GPU is lent rarely)
                traceback.print_exc()
                report[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
            report["seconds"][name] = time.time() - t0
            report["seconds"]["total"] = time.time() - t_start
            save()
            print(f"gpu-check: {name} done in {report['seconds'][name]:.1f} s", flush=True)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
