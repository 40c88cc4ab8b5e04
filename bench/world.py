"""The embedded tiny text-to-image world: procedural captioned images with ground truth.

Every image is 32x32 RGB on a black background and holds 1-4 objects that share one colour and one
shape.  Its caption comes from a small grammar::

    caption  := count colour shape [" on the " position]
    count    := "a" | "two" | "three" | "four"        (shape is plural when count > 1)
    colour   := "red" | "green" | "blue" | "yellow"
    shape    := "circle" | "square" | "triangle"
    position := "left" | "right" | "top" | "bottom"   (only with a single object)

e.g. "two red circles", "a blue square on the left".  Scenes carry their ground-truth attributes,
so the judge (``bench/judge.py``) can be trained on renders and then read generated samples.

Rendering is anti-aliased by 4x supersampling; colours get a little per-image jitter and object
radii vary, so the world is not a lookup table.
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

SIZE = 32
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (50, 90, 235),
    "yellow": (230, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
POSITIONS = ("left", "right", "top", "bottom")
SUPERSAMPLE = 4
VOCAB = (["a", "two", "three", "four", "on", "the"] + list(COLOURS) + list(SHAPES)
         + [s + "s" for s in SHAPES] + list(POSITIONS))


@dataclasses.dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    position: str | None = None
    objects: tuple[tuple[float, float, float], ...] = ()  # (cx, cy, radius) in pixels

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.count, self.position)


def caption(colour: str, shape: str, count: int, position: str | None = None) -> str:
    noun = shape + ("s" if count > 1 else "")
    text = f"{COUNT_WORDS[count]} {colour} {noun}"
    return f"{text} on the {position}" if position else text


def parse_caption(text: str) -> dict[str, object]:
    """Inverse of :func:`caption`; raises ValueError for text outside the grammar."""
    words = text.strip().lower().split()
    counts = {w: c for c, w in COUNT_WORDS.items()}
    ok = len(words) in (3, 6) and words[0] in counts and words[1] in COLOURS
    if ok:
        count, colour, noun = counts[words[0]], words[1], words[2]
        shape = noun[:-1] if count > 1 and noun.endswith("s") else noun
        ok = shape in SHAPES and (noun == shape) == (count == 1)
    position = None
    if ok and len(words) == 6:
        ok = words[3:5] == ["on", "the"] and words[5] in POSITIONS and count == 1
        position = words[5]
    if not ok:
        raise ValueError(f"{text!r} is not a tiny-world caption (e.g. 'two red circles', "
                         "'a blue square on the left')")
    return {"colour": colour, "shape": shape, "count": count, "position": position}


def all_captions() -> list[str]:
    """Every caption of the grammar (48 without position + 48 with one)."""
    out = [caption(c, s, n) for c, s, n in itertools.product(COLOURS, SHAPES, COUNT_WORDS)]
    out += [caption(c, s, 1, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]
    return out


def _region(position: str | None, r: float) -> tuple[float, float, float, float]:
    lo, hi = r + 1.0, SIZE - r - 1.0
    x0, x1, y0, y1 = lo, hi, lo, hi
    if position == "left":
        x1 = min(hi, 11.0)
    elif position == "right":
        x0 = max(lo, 21.0)
    elif position == "top":
        y1 = min(hi, 11.0)
    elif position == "bottom":
        y0 = max(lo, 21.0)
    return x0, x1, y0, y1


def sample_scene(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                 count: int | None = None, position: str | None = None,
                 position_prob: float = 0.25) -> Scene:
    """Draw a scene; attributes left as None are drawn uniformly."""
    colour = colour or list(COLOURS)[rng.integers(len(COLOURS))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    count = count or int(rng.integers(1, 5))
    if position is None and count == 1 and rng.random() < position_prob:
        position = POSITIONS[rng.integers(len(POSITIONS))]
    for _ in range(100):  # rejection sampling of non-overlapping placements
        objects: list[tuple[float, float, float]] = []
        for _ in range(count):
            r = float(rng.uniform(4.0, 6.0) if count <= 2 else rng.uniform(3.5, 4.8))
            x0, x1, y0, y1 = _region(position, r)
            for _ in range(50):
                cx, cy = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
                if all((cx - ox) ** 2 + (cy - oy) ** 2 > (r + orad + 1.5) ** 2 for ox, oy, orad in objects):
                    objects.append((cx, cy, r))
                    break
        if len(objects) == count:
            return Scene(colour, shape, count, position, tuple(objects))
    raise RuntimeError("could not place objects")  # pragma: no cover - never seen with these sizes


def scene_from_caption(text: str, rng: np.random.Generator) -> Scene:
    a = parse_caption(text)
    return sample_scene(rng, a["colour"], a["shape"], a["count"], a["position"], position_prob=0.0)


_GRID = (np.arange(SIZE * SUPERSAMPLE) + 0.5) / SUPERSAMPLE


def _mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    x, y = _GRID[None, :], _GRID[:, None]
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(x - cx) <= h) & (np.abs(y - cy) <= h)
    # upward triangle: apex at the top, base at the bottom
    top, bottom = cy - r, cy + 0.8 * r
    frac = (y - top) / (bottom - top)
    return (frac >= 0) & (frac <= 1) & (np.abs(x - cx) <= frac * r * 1.1)


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render to float32 HxWx3 in [0, 1]."""
    base = np.array(COLOURS[scene.colour], dtype=np.float32) / 255.0
    if rng is not None:
        base = np.clip(base + rng.uniform(-0.06, 0.06, size=3).astype(np.float32), 0.0, 1.0)
    n = SIZE * SUPERSAMPLE
    cover = np.zeros((n, n), dtype=np.float32)
    for cx, cy, r in scene.objects:
        cover = np.maximum(cover, _mask(scene.shape, cx, cy, r).astype(np.float32))
    cover = cover.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE).mean(axis=(1, 3))
    return cover[..., None] * base[None, None, :]


def batch(rng: np.random.Generator, n: int, **kw) -> tuple[np.ndarray, list[Scene]]:
    """n random scenes rendered as an (n, 3, 32, 32) float32 array in [0, 1]."""
    scenes = [sample_scene(rng, **kw) for _ in range(n)]
    images = np.stack([render(s, rng) for s in scenes]).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), scenes
