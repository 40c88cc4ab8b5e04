"""``make perf`` (``python -m bench.tools.perf``): where one optimizer step's time goes, against the floor of the UNet
passes the method has to make, and how step time and memory grow with the work.

For each method at its preset on the tiny world (and AlignProp and DDPO-SF on a small random-weight latent Stable
Diffusion pipeline, where a VAE decodes), one process per measurement (so its peak memory is its own): the run is
built as ``bench run`` builds it, one update is made untimed (warm-up), then ``--steps`` updates are timed, split into

    unet_forward    the UNet's forward calls outside backpropagation (hooks on the UNet module)
    backward        the whole backward pass (``ctx.backward``: the UNet's, and the reward's and decoder's where
                    the method backpropagates through them; with gradient checkpointing the recomputed forwards too)
    vae_decode      ``pipe.decode`` (latent models; a clamp for pixel models)
    text_encoding   ``pipe.encode_prompts``
    reward          the training reward's calls
    optimizer       gradient clipping and the (guarded) optimizer steps
    store           a checkpoint and the metrics table, divided by ``checkpoint_every`` (what the harness amortises)
    other           the rest of the step (sampling bookkeeping, DDIM arithmetic, data, losses, Python)

The floor is the passes the method must make at that batch, timed alone in the same process on the same UNet:
(forward-only passes) x (one forward per image, no gradients) + (passes with backward) x (one forward + backward per
image), each at the batch size the method's own UNet calls used most; plus the passes of every other network the
method owns (OGDM's discriminator, DPOK's value network: any ``torch.nn.Module`` attribute of its ``Method``), each
call replayed alone on its first call's inputs, as a forward, or as a forward + backward where the call kept gradients
(its weights or an input require them); ``ratio`` = step / floor.  Images per second
counts the training images the step generates (the preference and data methods generate none).

The scaling runs vary the batch (and, for the sampling families, the DDIM steps) of one method per family.
Everything goes to ``docs/perf.json`` and ``docs/perf.md``, and a figure per family to ``docs/perf/``.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from bench.core.config import resolve
from bench.core.context import GuardedOptimizer
from bench.core.run import Run, peak_memory_mb
from diffalign.store import PROJECT_ROOT, RunFolder, atomic_write_json, atomic_write_text
from methods import METHODS as REGISTERED

PARTS = ("unet_forward", "backward", "vae_decode", "text_encoding", "reward", "optimizer", "store", "other")
METHODS = tuple(REGISTERED)  # every registered method, in the registry's order
NO_EVAL = ["eval.kl_seeds=0", "steps=100000", "checkpoint_every=5"]
# one method per family: (method, batch key and values, DDIM-step values or None); extra overrides per batch value
SCALING = {
    "reward backprop": ("alignprop", "alignprop.batch_size", [2, 4, 8, 16], [5, 10, 20]),
    "policy gradient": ("ddpo-sf", "ddpo.samples_per_step", [8, 16, 32], [5, 10, 20]),
    "preference": ("dde", "dde.batch_size", [4, 8, 16, 32], None),
    "discriminator": ("ogdm", "ogdm.batch_size", [8, 16, 32, 64], None),
}


def _batch_overrides(key: str, value: int) -> list[str]:
    if key == "ddpo.samples_per_step":  # keep the method's own constraints: sample batches of 8, train batch x accum
        return [f"{key}={value}", f"ddpo.sample_batch_size={min(value, 8)}", "ddpo.train_batch_size=4",
                f"ddpo.grad_accum={value // 4}"]
    return [f"{key}={value}"]


class Meter:
    """Seconds per part, the batch sizes of the UNet's calls, and the calls of the method's other networks."""

    def __init__(self):
        self.seconds = collections.defaultdict(float)
        self.in_backward = False
        self.unet_batches: collections.Counter = collections.Counter()
        self._starts: list[float] = []
        self.aux_calls: dict[str, collections.Counter] = {}  # network -> {"forward": n, "forward+backward": n}
        self.aux_inputs: dict[str, tuple] = {}  # network -> its first call's (args, kwargs), detached

    @contextlib.contextmanager
    def part(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - t0

    def wrap(self, name: str, fn):
        def timed(*a, **k):
            with self.part(name):
                return fn(*a, **k)
        return timed


def instrument(run: Run, meter: Meter):
    """Hooks and wrappers on one (throwaway) run's objects; nothing is changed but timed.  Returns the undo of
    the one class-level wrapper (the guarded optimizer's step)."""
    pipe, ctx = run.ctx.pipe, run.ctx
    unet = pipe.unet

    def pre(module, args, kwargs):
        meter.unet_batches[int(args[0].shape[0])] += 0 if meter.in_backward else 1
        meter._starts.append(time.perf_counter())

    def post(module, args, kwargs, out):
        t0 = meter._starts.pop()
        if not meter.in_backward:
            meter.seconds["unet_forward"] += time.perf_counter() - t0

    unet.register_forward_pre_hook(pre, with_kwargs=True)
    unet.register_forward_hook(post, with_kwargs=True)
    for name, module in other_networks(run).items():
        module.register_forward_pre_hook(functools.partial(_other_call, meter, name), with_kwargs=True)
    pipe.decode = meter.wrap("vae_decode", pipe.decode)
    pipe.encode_prompts = meter.wrap("text_encoding", pipe.encode_prompts)
    backward = ctx.backward

    def timed_backward(loss):
        meter.in_backward = True
        try:
            with meter.part("backward"):
                backward(loss)
        finally:
            meter.in_backward = False

    ctx.backward = timed_backward
    ctx.clip_grad = meter.wrap("optimizer", ctx.clip_grad)
    reward = ctx.reward

    class TimedReward:
        def __getattr__(self, name):
            return getattr(reward, name)

        def __call__(self, images, prompts):
            with meter.part("reward"):
                return reward(images, prompts)

    ctx.reward = TimedReward()
    step = GuardedOptimizer.step
    GuardedOptimizer.step = lambda self: meter.wrap("optimizer", step)(self)

    def undo():
        GuardedOptimizer.step = step

    return undo


def _detached(x):
    return x.detach().clone() if torch.is_tensor(x) else x


def _other_call(meter: Meter, name: str, module, args, kwargs) -> None:
    """A forward pre-hook on one of the method's other networks: count the call, keep the first one's inputs."""
    if meter.in_backward:
        return
    tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
    grads = torch.is_grad_enabled() and (any(p.requires_grad for p in module.parameters())
                                         or any(a.requires_grad for a in tensors))
    meter.aux_calls.setdefault(name, collections.Counter())["forward+backward" if grads else "forward"] += 1
    if name not in meter.aux_inputs:
        meter.aux_inputs[name] = (tuple(_detached(a) for a in args), {k: _detached(v) for k, v in kwargs.items()})


def other_networks(run: Run) -> dict[str, torch.nn.Module]:
    """The networks a method owns beside the UNet (its ``Method``'s ``torch.nn.Module`` attributes)."""
    return {k: v for k, v in vars(run.method).items() if isinstance(v, torch.nn.Module) and v is not run.ctx.pipe.unet}


def other_pass_times(module: torch.nn.Module, inputs: tuple, reps: int = 3) -> tuple[float, float]:
    """(seconds of one forward without gradients, of one forward + backward to the weights) of ``module`` on
    ``inputs`` (args, kwargs), alone; best of ``reps``."""
    args, kwargs = inputs
    params = list(module.parameters())
    wanted = [p.requires_grad for p in params]

    def fwd():
        with torch.no_grad():
            module(*args, **kwargs)

    def fwd_bwd():
        for p in params:
            p.requires_grad_(True)
        module(*args, **kwargs).float().sum().backward()
        for p, w in zip(params, wanted):
            p.grad = None
            p.requires_grad_(w)

    out = []
    for fn in (fwd, fwd_bwd):
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out.append(best)
    return out[0], out[1]


def unet_pass_times(run: Run, batch: int, reps: int = 3) -> tuple[float, float]:
    """(seconds per image of a forward without gradients, of a forward + backward) at ``batch``, alone."""
    pipe = run.ctx.pipe
    unet, g = pipe.unet, torch.Generator().manual_seed(0)
    x = torch.randn((batch, *pipe.latent_shape), generator=g).to(pipe.device, pipe.dtype)
    t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (batch,), generator=g).to(pipe.device)
    cond = pipe.encode_prompts(["a red circle"] * batch)

    def fwd():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=cond)

    def fwd_bwd():
        unet(x, t, encoder_hidden_states=cond).sample.float().pow(2).mean().backward()
        for p in run.ctx.trainable:
            p.grad = None

    out = []
    for fn in (fwd, fwd_bwd):
        fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out.append(best / batch)
    return out[0], out[1]


def measure(method: str, overrides: list[str], steps: int) -> dict:
    """One method, one setting: the timed breakdown of ``steps`` updates after one untimed one."""
    cfg = resolve(method, overrides + NO_EVAL)
    with tempfile.TemporaryDirectory(prefix="perf-") as tmp:
        run = Run(cfg, RunFolder(os.path.join(tmp, "run")))
        os.makedirs(run.folder.path)
        run.first_eval, run.t0 = {}, time.time()
        run.method.step()  # warm-up: first calls, lazy set-up, a DDPO round's sampling
        meter = Meter()
        undo = instrument(run, meter)
        try:
            return _timed(run, cfg, meter, steps, overrides)
        finally:
            undo()


def _timed(run: Run, cfg, meter: Meter, steps: int, overrides: list[str]) -> dict:
    """The timed updates, the amortised store writes and the floor (see the module docstring)."""
    costs0 = dict(run.ctx.costs.state_dict())
    total = record = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        run.step += 1
        run.ctx.step = run.step
        metrics = run.method.step()
        total += time.perf_counter() - t0
        t0 = time.perf_counter()
        run.record(metrics, None)  # the metrics row, as the harness writes one every step
        record += time.perf_counter() - t0
    t0 = time.perf_counter()
    run.checkpoint()
    store = record / steps + (time.perf_counter() - t0) / cfg.checkpoint_every
    costs = {k: (v - costs0[k]) / steps for k, v in run.ctx.costs.state_dict().items()}
    batch = meter.unet_batches.most_common(1)[0][0] if meter.unet_batches else 1
    step = total / steps + store
    parts = {p: meter.seconds.get(p, 0.0) / steps for p in PARTS if p not in ("store", "other")}
    t_fwd, t_fwdbwd = unet_pass_times(run, batch)  # after the parts are read: its calls pass the hooks too
    parts["store"] = store
    parts["other"] = max(0.0, step - sum(parts.values()))
    floor_unet = (costs["unet_fwd"] - costs["unet_bwd"]) * t_fwd + costs["unet_bwd"] * t_fwdbwd
    others = {}
    for name, module in other_networks(run).items():
        calls = collections.Counter(meter.aux_calls.get(name))  # read before the replay below (its calls count too)
        if not calls:
            continue
        o_fwd, o_fwdbwd = other_pass_times(module, meter.aux_inputs[name])
        others[name] = {"forward_per_step": calls["forward"] / steps,
                        "forward_backward_per_step": calls["forward+backward"] / steps,
                        "forward_s": o_fwd, "forward_backward_s": o_fwdbwd,
                        "floor_s": (calls["forward"] * o_fwd + calls["forward+backward"] * o_fwdbwd) / steps}
    floor = floor_unet + sum(o["floor_s"] for o in others.values())
    return {"method": cfg.method, "variant": cfg.variant, "overrides": overrides, "model": cfg.model,
            "threads": torch.get_num_threads(), "step_s": step, "parts_s": parts, "floor_s": floor,
            "ratio": step / floor if floor > 0 else None, "floor_unet_s": floor_unet, "other_networks": others,
            "unet_call_batch": batch,
            "unet_fwd_per_step": costs["unet_fwd"], "unet_bwd_per_step": costs["unet_bwd"],
            "unet_fwd_s_per_image": t_fwd, "unet_fwd_bwd_s_per_image": t_fwdbwd,
            "images_per_step": costs["images"], "images_per_s": costs["images"] / step,
            "peak_mem_mb": peak_memory_mb(run.device)}


def latent_pipeline(path: str) -> str:
    """A small random-weight latent Stable Diffusion pipeline (SD v1 scheduler, a VAE), saved once."""
    if os.path.isdir(path):
        return path
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from bench.tinyworld import models as tiny_models

    comps = tiny_models.build_components(seed=1)
    torch.manual_seed(1)
    comps["unet"] = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        norm_num_groups=8, attention_head_dim=8)
    comps["vae"] = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32, 32), latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=64)
    comps["scheduler"] = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    tiny_models.save_pipeline(comps, path)
    return path


def _one(method: str, overrides: list[str], steps: int) -> dict:
    """A measurement in its own process (its peak memory is its own)."""
    cmd = [sys.executable, "-m", "bench.tools.perf", "--one", method, "--steps", str(steps), "--set", *overrides]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"perf of {method} {overrides} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot_family(name: str, rows: list[dict], path: str) -> None:
    from bench.outputs.plots import pyplot
    from diffalign.store import save_figure

    plt = pyplot()
    batch_rows = [r for r in rows if r["axis"] == "batch"]
    step_rows = [r for r in rows if r["axis"] == "ddim_steps"]
    panels = 4 if step_rows else 2
    fig, axes = plt.subplots(1, panels, figsize=(3.0 * panels, 2.6))
    for ax, (rs, xkey, ykey, ylabel) in zip(axes, [
            (batch_rows, "value", "step_s", "step time (s)"), (batch_rows, "value", "peak_mem_mb", "peak memory (MB)"),
            (step_rows, "value", "step_s", "step time (s)"), (step_rows, "value", "peak_mem_mb", "peak memory (MB)")]):
        ax.plot([r[xkey] for r in rs], [r[ykey] for r in rs], marker="o")
        ax.set_xlabel("batch" if rs is batch_rows else "DDIM steps")
        ax.set_ylabel(ylabel)
    fig.suptitle(f"{name}: {rows[0]['method']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def markdown(report: dict) -> str:
    lines = ["# Cost of one optimizer step (`make perf`)", "",
             f"Measured {report['date']} on {report['machine']}, torch threads {report['threads']}; "
             f"{report['steps']} timed steps after one untimed, each measurement in its own process "
             "(bench/tools/perf.py says what each column holds).", "",
             "| method | model | step (s) | floor (s) | step / floor | " + " | ".join(PARTS) +
             " | UNet passes fwd / bwd | images / s | peak MB |",
             "|" + " --- |" * (9 + len(PARTS))]
    for r in report["methods"]:
        model = {"models/tiny-t2i": "tiny world"}.get(r["model"], "latent SD (random)" if "perf-latent-sd" in r["model"]
                                                      else os.path.basename(r["model"].rstrip("/")))
        parts = " | ".join(f"{r['parts_s'][p]:.3f}" for p in PARTS)
        lines.append(f"| {r['method']} | {model} | {r['step_s']:.3f} | {r['floor_s']:.3f} | {r['ratio']:.2f} | "
                     f"{parts} | {r['unet_fwd_per_step']:.0f} / {r['unet_bwd_per_step']:.0f} | "
                     f"{r['images_per_s']:.2f} | {r['peak_mem_mb']:.0f} |")
    others = [f"{r['method']}'s {name} ({o['forward_backward_per_step']:g} forward + backward and "
              f"{o['forward_per_step']:g} forward passes per step, {o['floor_s']:.3f} s)"
              for r in report["methods"] for name, o in (r.get("other_networks") or {}).items()]
    if others:
        lines += ["", "The floor includes the passes of the methods' other networks: " + "; ".join(others) + "."]
    lines += ["", "Scaling (one method per family; step time and peak memory):", ""]
    for fam, rows in report["scaling"].items():
        lines.append(f"- {fam} ({rows[0]['method']}): " + "; ".join(
            f"{'batch' if r['axis'] == 'batch' else 'DDIM steps'} {r['value']}: {r['step_s']:.2f} s, "
            f"{r['peak_mem_mb']:.0f} MB" for r in rows) + f" (docs/perf/{fam.replace(' ', '_')}.png)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help="measure one method (internal: one process per measurement)")
    p.add_argument("--set", nargs="*", default=[], help="overrides for --one")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--out", default="docs")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.one, a.set, a.steps)))
        return 0
    import datetime
    import platform

    t0 = time.time()
    latent = latent_pipeline(os.path.join(PROJECT_ROOT, "results", "cache", "perf-latent-sd"))
    rows = [_one(m, [], a.steps) for m in a.methods]
    for m in ("alignprop", "ddpo-sf"):
        if m in a.methods:
            rows.append(_one(m, [f"model={latent}", "judge=null", "reward=saturation"], a.steps))
    scaling = {}
    if not a.no_scaling:
        for fam, (method, key, batches, ddim) in SCALING.items():
            pts = [{**_one(method, _batch_overrides(key, b), a.steps), "axis": "batch", "value": b} for b in batches]
            pts += [{**_one(method, [f"sampler.num_steps={s}"], a.steps), "axis": "ddim_steps", "value": s}
                    for s in ddim or []]
            scaling[fam] = pts
            os.makedirs(os.path.join(a.out, "perf"), exist_ok=True)
            plot_family(fam, pts, os.path.join(a.out, "perf", fam.replace(" ", "_") + ".png"))
    report = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "threads": torch.get_num_threads(), "steps": a.steps, "methods": rows, "scaling": scaling,
              "seconds": time.time() - t0}
    atomic_write_json(os.path.join(a.out, "perf.json"), report)
    atomic_write_text(os.path.join(a.out, "perf.md"), markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
