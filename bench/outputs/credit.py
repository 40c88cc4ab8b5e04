"""The credit-assignment curves of the preference methods: ``python -m bench.outputs.credit --out FILE``.

One figure, a panel per noise schedule (the tiny world's cosine schedule and Stable Diffusion's scaled-linear one),
each with the four per-timestep credit weights of ``methods/dde.py`` (uniform = Diffusion-DPO, stepwise = the
ELBO's, single-shot, and DDE's reconstruction), normalised to mean 1 over the training timesteps, on a log scale.
``--json`` also writes the curves (every 10th timestep) for tables.
"""
from __future__ import annotations

import argparse

from diffusers import DDIMScheduler

from bench.outputs.plots import pyplot
from bench.tinyworld.models import SCHEDULER_CONFIG
from diffalign.store import atomic_write_json, save_figure
from methods import dde

SCHEDULES = {
    "tiny world (cosine, capped)": lambda: DDIMScheduler(**SCHEDULER_CONFIG),
    "Stable Diffusion (scaled linear)": lambda: DDIMScheduler(beta_start=0.00085, beta_end=0.012,
                                                              beta_schedule="scaled_linear", clip_sample=False,
                                                              set_alpha_to_one=False, steps_offset=1),
}


def curves(section: dict | None = None) -> dict[str, dict[str, list[float]]]:
    """schedule -> weighting -> the normalised weight at every training timestep."""
    section = {**dde.DEFAULTS, **(section or {})}
    return {name: {w: dde.credit_weights(make(), {**section, "weighting": w}).tolist() for w in dde.WEIGHTINGS}
            for name, make in SCHEDULES.items()}


def plot(out: str, section: dict | None = None) -> dict:
    data = curves(section)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(data), figsize=(9, 3.0), squeeze=False)
    styles = {"uniform": ("tab:gray", "--"), "stepwise": ("tab:blue", "-"), "single-shot": ("tab:orange", "-"),
              "dde": ("tab:red", "-")}
    for ax, (name, ws) in zip(axes[0], data.items()):
        for w, ys in ws.items():
            colour, ls = styles[w]
            label = {"uniform": "uniform (Diffusion-DPO)", "stepwise": "stepwise (ELBO)",
                     "dde": "DDE (reconstructed)"}.get(w, w)
            ax.plot(range(len(ys)), [max(y, 1e-6) for y in ys], ls, color=colour, lw=1.4, label=label)
        ax.set_yscale("log")
        ax.set_ylim(1e-4, 1e4)
        ax.set_xlabel("training timestep t (0 = clean image, 999 = pure noise)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3, lw=0.5)
    axes[0][0].set_ylabel("credit weight (mean 1)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    save_figure(fig, out, dpi=130)
    plt.close(fig)
    return data


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="bench.outputs.credit", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="PNG or SVG file")
    p.add_argument("--json", help="also write the curves (every 10th timestep) here")
    a = p.parse_args(argv)
    data = plot(a.out)
    print(f"wrote {a.out}")
    if a.json:
        atomic_write_json(a.json, {name: {w: ys[::10] for w, ys in ws.items()} for name, ws in data.items()})
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
