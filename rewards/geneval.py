"""``tiny-geneval``: GenEval's all-or-nothing compositional rule on the tiny world, read by a second judge.

GenEval (Ghosh, Hajishirzi, Schmidt, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment", arXiv 2310.11513) scores an image 1 only when an object detector finds everything its prompt
asks for (the objects, their count, their colours, their relative position) and 0 otherwise.  Here the
detector is the **GenEval judge** (``models/tiny-geneval-judge``, :class:`GenevalNet`, trained by
``make geneval-judge`` = ``bench/tinyworld/geneval_judge.py``), a network independent of the held-out
judge (``models/tiny-judge``: another seed, another architecture, another corruption mix, and a
position head the held-out judge lacks), so a method trained on this reward is still measured by a
judge it never saw.

For a tiny-world caption ``count colour shape [on the position]`` (:func:`diffalign.world.parse_caption`)
the judge reads, per image,

- ``shape``: the object's shape (GenEval's "object"), right only when at least one object is seen;
- ``colour``: the objects' colour, right only when at least one object is seen;
- ``count``: the number of objects, 0-4 (0: a blank or garbage image);
- ``position``: for each of left / right / top / bottom, whether the object's centre lies in that
  region of the frame, the world's own definition (``diffalign.world._region``: centre x <= 11 for left,
  >= 21 for right, y <= 11 for top, >= 21 for bottom; regions overlap in the corners, so the head is four
  independent yes/no outputs, not one five-way choice; "none" is all four off).  Asked only when the
  prompt names a position (single objects only, as in the grammar).

**The rule**: ``tiny-geneval`` = 1 when every attribute the prompt asks for is read right, else 0.  The
per-attribute partial scores (:meth:`TinyGenEval.attributes`; a position not asked counts as right) are
kept after every call in ``last_terms`` (``tiny-geneval/shape``, ``/colour``, ``/count``, ``/position``),
which the harness logs as ``reward/...`` and ``eval_reward/...``.

**Differentiability: a straight-through estimator.**  The value is the 0/1 rule, exactly; the gradient
is that of the *soft score* s = P(shape) P(colour) P(count = n) [P(position)], the product over the asked
attributes of the judge's probability of the asked class (softmax for shape, colour, count; sigmoid for
the asked region): ``hard + (s - s.detach())``.  So methods that only look at values (DDPO, GRPO, RWR)
train on GenEval's own 0/1 signal, as Flow-GRPO does, while AlignProp and RLR get a gradient that raises
the probability of the rule being met (the rule is the soft score's argmax read of each factor; a 0/1
step function has no gradient of its own).  Chosen over two separate rewards because the reported value
then stays GenEval's, whichever family trains on it.  ``tiny-geneval-soft`` (:class:`TinyGenEvalSoft`)
returns the soft score itself as the value (a dense signal in [0, 1]), for comparison.

Prompts outside the grammar are refused with one BenchError line naming what is accepted.
"""
from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from diffalign import world
from diffalign.errors import BenchError
from diffalign.store import PROJECT_ROOT
from rewards.clip_common import check_images, freeze, load_strict

COLOURS = list(world.COLOURS)
SHAPES = list(world.SHAPES)
REGIONS = list(world.POSITIONS)            # left, right, top, bottom: the four position outputs
MAX_COUNT = 4
ATTRIBUTES = ("shape", "colour", "count", "position")
DEFAULT_PATH = os.path.join(PROJECT_ROOT, "models", "tiny-geneval-judge")
RECIPE = "rebuild it with 'make geneval-judge'"
ACCEPTED = ("accepted: tiny-world captions 'COUNT COLOUR SHAPE [on the POSITION]' with COUNT a/two/three/four, "
            f"COLOUR {'/'.join(COLOURS)}, SHAPE {'/'.join(SHAPES)} (plural after two-four), "
            f"POSITION {'/'.join(REGIONS)} (with 'a' only)")


def in_region(position: str, cx: float, cy: float) -> bool:
    """Whether an object centred at (cx, cy) (pixels) lies in ``position``'s region of the frame: the
    centre bounds of :func:`diffalign.world._region` for a zero radius (x <= 11 for left, >= 21 for right,
    y <= 11 for top, >= 21 for bottom; y grows downwards)."""
    x0, x1, y0, y1 = world._region(position, 0.0)
    return x0 <= cx <= x1 and y0 <= cy <= y1


class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv(SiLU(GN(conv(SiLU(GN(x))))))."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(groups, channels), nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class GenevalNet(nn.Module):
    """The GenEval judge: a residual CNN with GroupNorm on 32x32 images plus two coordinate channels
    (CoordConv, so that globally pooled features still know where things are).

    stem conv (5 -> w) at 32x32, stride-2 conv to 16x16, ``blocks`` residual blocks of width w, stride-2
    conv to 8x8 and width 2w, ``blocks`` residual blocks, GroupNorm + SiLU, then the spatial mean and max
    concatenated (4w) -> Linear(4w, hidden) + SiLU -> four heads: colour (4), shape (3), count (0-4) and
    position (4 independent logits: left, right, top, bottom).  Unlike the held-out judge (plain conv +
    ReLU + max-pool, a flattened fully connected trunk, no normalisation, no position)."""

    def __init__(self, width: int = 24, blocks: int = 2, hidden: int = 96, groups: int = 8):
        super().__init__()
        w = width
        self.stem = nn.Conv2d(5, w, 3, padding=1)
        self.down1 = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.stage1 = nn.Sequential(*[ResBlock(w, groups) for _ in range(blocks)])
        self.norm_d2 = nn.GroupNorm(groups, w)
        self.down2 = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1)
        self.stage2 = nn.Sequential(*[ResBlock(2 * w, groups) for _ in range(blocks)])
        self.norm_out = nn.GroupNorm(groups, 2 * w)
        self.trunk = nn.Sequential(nn.Linear(4 * w, hidden), nn.SiLU())
        self.heads = nn.ModuleDict({"colour": nn.Linear(hidden, len(COLOURS)),
                                    "shape": nn.Linear(hidden, len(SHAPES)),
                                    "count": nn.Linear(hidden, MAX_COUNT + 1),
                                    "position": nn.Linear(hidden, len(REGIONS))})
        ramp = (torch.arange(world.SIZE, dtype=torch.float32) + 0.5) / world.SIZE * 2 - 1
        self.register_buffer("coords", torch.stack([ramp[None, :].expand(world.SIZE, -1),
                                                    ramp[:, None].expand(-1, world.SIZE)])[None], persistent=False)
        self.config = {"width": width, "blocks": blocks, "hidden": hidden, "groups": groups}

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, 32, 32) in [0, 1] -> logits per attribute (position: four independent logits)."""
        x = torch.cat([images * 2 - 1, self.coords.to(images.dtype).expand(images.shape[0], -1, -1, -1)], 1)
        h = self.stage1(self.down1(F.silu(self.stem(x))))
        h = self.stage2(self.down2(F.silu(self.norm_d2(h))))
        h = F.silu(self.norm_out(h))
        h = self.trunk(torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1))
        return {k: head(h) for k, head in self.heads.items()}


def to_size(images: torch.Tensor) -> torch.Tensor:
    """Resize to the world's 32x32 (bilinear, antialiased, differentiable) when needed."""
    if images.shape[-2:] != (world.SIZE, world.SIZE):
        images = F.interpolate(images, size=(world.SIZE, world.SIZE), mode="bilinear", align_corners=False,
                               antialias=True)
    return images


def load_geneval_judge(path: str | None = None) -> GenevalNet:
    """The judge saved in ``path`` (``config.json`` + ``model.safetensors``), frozen, in eval mode."""
    path = path or DEFAULT_PATH
    missing = [f for f in ("config.json", "model.safetensors") if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise BenchError(f"GenEval judge folder {path!r} lacks {', '.join(missing)} ({RECIPE})")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = GenevalNet(**{k: cfg[k] for k in ("width", "blocks", "hidden", "groups")})
    load_strict(model, load_file(os.path.join(path, "model.safetensors")), path=path, who="tiny-geneval")
    return freeze(model)


def parse_prompts(prompts: list[str], who: str = "tiny-geneval") -> list[dict]:
    """Each prompt's asked attributes; one BenchError line naming what is accepted for text outside the grammar."""
    out = []
    for p in prompts:
        try:
            out.append(world.parse_caption(p))
        except (ValueError, AttributeError):
            raise BenchError(f"reward {who!r}: prompt {p!r} is not a tiny-world caption; {ACCEPTED}") from None
    return out


class TinyGenEval:
    """GenEval's rule on the tiny world: 1 when the GenEval judge reads every asked attribute right, else 0;
    the gradient is the soft score's (straight-through; see the module docstring)."""

    name = "tiny-geneval"
    differentiable = True
    gold = "fidelity"  # the held-out judge's prompt fidelity: what this rule, read by the second judge, stands for

    def __init__(self, path: str | None = None):
        self.model = load_geneval_judge(path)
        self.last_terms: dict[str, torch.Tensor] = {}

    def to(self, device):
        self.model.to(device)
        return self

    def probabilities(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The judge's class probabilities per attribute (differentiable): softmax over colour, shape and
        count 0-4; an independent sigmoid per region for position."""
        check_images(images, who=self.name)
        dev = next(self.model.parameters()).device
        logits = self.model(to_size(images.float().to(dev)))
        return {k: (torch.sigmoid(v) if k == "position" else v.softmax(-1)) for k, v in logits.items()}

    def _asked(self, prompts: list[str], device) -> dict[str, torch.Tensor]:
        want = parse_prompts(prompts, self.name)
        return {"shape": torch.tensor([SHAPES.index(w["shape"]) for w in want], device=device),
                "colour": torch.tensor([COLOURS.index(w["colour"]) for w in want], device=device),
                "count": torch.tensor([w["count"] for w in want], device=device),
                "position": torch.tensor([REGIONS.index(w["position"]) if w["position"] else -1 for w in want],
                                         device=device)}

    def _score(self, images: torch.Tensor, prompts: list[str]):
        """(hard rule, soft score, partials) with the probabilities computed once."""
        check_images(images, prompts, who=self.name)
        probs = self.probabilities(images)
        asked = self._asked(prompts, probs["count"].device)
        has_pos = asked["position"] >= 0
        pos_idx = asked["position"].clamp(min=0)[:, None]
        p_pos = probs["position"].gather(1, pos_idx)[:, 0]
        factors = {k: probs[k].gather(1, asked[k][:, None])[:, 0] for k in ("shape", "colour", "count")}
        factors["position"] = torch.where(has_pos, p_pos, torch.ones_like(p_pos))
        soft = factors["shape"] * factors["colour"] * factors["count"] * factors["position"]
        with torch.no_grad():
            seen = probs["count"].argmax(-1) >= 1
            parts = {k: (probs[k].argmax(-1) == asked[k]) & seen for k in ("shape", "colour")}
            parts["count"] = probs["count"].argmax(-1) == asked["count"]
            parts["position"] = ~has_pos | (p_pos > 0.5)
            hard = parts["shape"] & parts["colour"] & parts["count"] & parts["position"]
        parts = {k: v.float() for k, v in parts.items()}
        self.last_terms = {f"{self.name}/{k}": parts[k] for k in ATTRIBUTES}
        return hard.float(), soft, parts, has_pos

    def attributes(self, images: torch.Tensor, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Per image, 1.0 / 0.0 for each attribute read right (``shape``, ``colour``, ``count``, ``position``;
        a position not asked counts as right), ``all`` (the rule), ``soft`` (the soft score) and
        ``position_asked`` (1.0 where the prompt names a position)."""
        with torch.no_grad():
            hard, soft, parts, has_pos = self._score(images, prompts)
        return {**parts, "all": hard, "soft": soft, "position_asked": has_pos.float()}

    def soft(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The product over the asked attributes of the judge's probability of the asked class (B,)."""
        return self._score(images, prompts)[1]

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        hard, soft, _, _ = self._score(images, prompts)
        return hard + (soft - soft.detach())   # the value is the rule exactly; the gradient is the soft score's


class TinyGenEvalSoft(TinyGenEval):
    """The soft score itself as the value: P(shape) P(colour) P(count) [P(position)] in [0, 1]."""

    name = "tiny-geneval-soft"

    def __call__(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return self._score(images, prompts)[1]
