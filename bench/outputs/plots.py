"""Figures of one run: the reward curve and the sample grids (written atomically)."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageDraw

from diffalign import store
from diffalign.errors import BenchError

CELL = 96  # pixels per sample in grids (32x32 images upscaled 3x, nearest)
GAP = 2  # pixels between cells
LABEL_W = 170  # the prompt column on the left of a grid
HEAD_TITLED, HEAD_PLAIN = 22, 4  # pixels above the first row, with and without a title


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend."""
    import matplotlib  # lazy: heavy package, needed only when a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(df, path: str, title: str = "", proxy: str | None = None) -> None:
    """The run's curves: the reward (train batches, eval ± SE) and, on the tiny world, the held-out judge's prompt
    fidelity.  ``proxy``: the name of a training reward that has the fidelity as its gold counterpart (a
    ``tiny-geneval`` reward, read by the second judge): its eval curve is drawn on the fidelity axes too, proxy
    against gold on one scale (issue 29)."""
    plt = pyplot()
    has_fid = "fidelity" in df
    fig, axes = plt.subplots(1, 2 if has_fid else 1, figsize=(9 if has_fid else 5, 3.4), squeeze=False)
    ax = axes[0, 0]
    if "reward_mean" in df and df["reward_mean"].notna().any():
        ax.plot(df["step"], df["reward_mean"], color="tab:blue", alpha=0.6, label="train reward (batch mean)")
    ev = df[df["eval_reward_mean"].notna()] if "eval_reward_mean" in df else df.iloc[:0]
    if len(ev):
        ax.errorbar(ev["step"], ev["eval_reward_mean"], yerr=ev["eval_reward_sem"], color="tab:red", marker="o",
                    capsize=3, label="eval reward (mean ± SE)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("reward")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.2), frameon=False)  # under the axes
    ax.set_title(title, fontsize=9)
    if has_fid:
        ax = axes[0, 1]
        fv = df[df["fidelity"].notna()]
        for key, style in (("fidelity", "-o"), ("fidelity_colour", "--"), ("fidelity_shape", "--"),
                           ("fidelity_count", "--")):
            if key in fv:
                label = key.replace("fidelity_", "") if key != "fidelity" else ("gold: all" if proxy else "all")
                ax.plot(fv["step"], fv[key], style, label=label)
        if proxy and len(ev):
            ax.errorbar(ev["step"], ev["eval_reward_mean"], yerr=ev["eval_reward_sem"], color="black", marker="s",
                        capsize=3, label=f"proxy: {proxy} (trained on)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("prompt fidelity (judge, held-out)" if not proxy else "gold: held-out judge; proxy: trained on")
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.2), frameon=False, ncol=4)
    fig.tight_layout()
    store.save_figure(fig, path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def grid_image(images, prompts: list[str], per_row: int, title: str = ""):
    """Rows = prompts (their seeds along the row), a label column on the left."""
    arr = (images.float().clamp(0, 1).cpu().numpy().transpose(0, 2, 3, 1) * 255).round().astype(np.uint8)
    rows = len(arr) // per_row
    label_w, head = LABEL_W, HEAD_TITLED if title else HEAD_PLAIN
    canvas = Image.new("RGB", (label_w + per_row * (CELL + GAP), head + rows * (CELL + GAP)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((4, 4), title, fill=(0, 0, 0))
    for i, im in enumerate(arr):
        r, c = divmod(i, per_row)
        tile = Image.fromarray(im).resize((CELL, CELL), Image.NEAREST)
        canvas.paste(tile, (label_w + c * (CELL + GAP), head + r * (CELL + GAP)))
        if c == 0:
            draw.text((4, head + r * (CELL + GAP) + CELL // 2 - 6), prompts[i][:28], fill=(0, 0, 0))
    return canvas


def save_grid(images, prompts: list[str], per_row: int, path: str, title: str = "") -> None:
    img = grid_image(images, prompts, per_row, title)
    store.atomic_write_with(path, lambda b: img.save(b, format="PNG"))


def save_before_after(before: str, after: str, path: str) -> None:
    """Two grids side by side (start | end), for the README and for eyes."""
    if not (os.path.isfile(before) and os.path.isfile(after)):
        return
    a, b = Image.open(before), Image.open(after)
    canvas = Image.new("RGB", (a.width + b.width + 12, max(a.height, b.height)), (255, 255, 255))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width + 12, 0))
    store.atomic_write_with(path, lambda buf: canvas.save(buf, format="PNG"))


# ---- comparison figures (bench compare --grid, bench report) -------------------------------------------

def read_grid_cells(path: str) -> list[list]:
    """The sample tiles of a grid written by ``save_grid`` (with a title, as the harness writes them):
    ``cells[prompt][seed]`` as PIL images of CELL x CELL pixels.  The layout is ``grid_image``'s."""
    img = Image.open(path).convert("RGB")
    rows, extra_h = divmod(img.height - HEAD_TITLED, CELL + GAP)
    per_row, extra_w = divmod(img.width - LABEL_W, CELL + GAP)
    if rows < 1 or per_row < 1 or extra_h or extra_w:
        raise BenchError(f"{path!r} is not a sample grid written by the harness ({img.width}x{img.height} px); "
                         "accepted: grids/step_NNNNNN.png of a run folder")
    return [[img.crop((LABEL_W + c * (CELL + GAP), HEAD_TITLED + r * (CELL + GAP),
                       LABEL_W + c * (CELL + GAP) + CELL, HEAD_TITLED + r * (CELL + GAP) + CELL))
             for c in range(per_row)] for r in range(rows)]


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def side_by_side_image(rows: list[tuple[str, list]], prompts: list[str]):
    """A row per method (label on the left, one tile per prompt), the prompts as column heads."""
    n = max(len(tiles) for _, tiles in rows)
    heads = [_wrap(p, 15)[:3] for p in prompts[:n]]
    head = 6 + 12 * max((len(h) for h in heads), default=1)
    canvas = Image.new("RGB", (LABEL_W + n * (CELL + GAP), head + len(rows) * (CELL + GAP)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(heads):
        for i, line in enumerate(lines):
            draw.text((LABEL_W + c * (CELL + GAP) + 2, 3 + 12 * i), line, fill=(0, 0, 0))
    for r, (label, tiles) in enumerate(rows):
        y = head + r * (CELL + GAP)
        for i, line in enumerate(_wrap(label, 26)[:4]):
            draw.text((4, y + CELL // 2 - 12 + 12 * i), line, fill=(0, 0, 0))
        for c, tile in enumerate(tiles):
            canvas.paste(tile.resize((CELL, CELL)), (LABEL_W + c * (CELL + GAP), y))
    return canvas
