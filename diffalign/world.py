"""The embedded tiny text-to-image world: procedural captioned images with ground truth.

Every image is 32x32 RGB on a black background and holds 1-4 objects that share one colour and one
shape.  Its caption comes from a small grammar::

    caption  := count colour shape [" on the " position]
    count    := "a" | "two" | "three" | "four"        (shape is plural when count > 1)
    colour   := "red" | "green" | "blue" | "yellow"
    shape    := "circle" | "square" | "triangle"
    position := "left" | "right" | "top" | "bottom"   (only with a single object)

e.g. "two red circles", "a blue square on the left".  Scenes carry their ground-truth attributes,
so the judge (``bench/tinyworld/judge.py``) can be trained on renders and then read generated samples.

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


# ---------------------------------------------------------------------------------------------------------
# The hidden "aesthetic" rating
# ---------------------------------------------------------------------------------------------------------

RATING_WEIGHTS = {"size": 3.0, "clean": 3.0, "smooth": 2.0, "vivid": 1.0, "centred": 1.0}  # sums to 10
TARGET_COVER = 0.30  # the fraction of the frame that the best-rated images cover with objects


def _median3(x: np.ndarray) -> np.ndarray:
    """3x3 median filter over the last two axes (edges replicated)."""
    p = np.pad(x, [(0, 0)] * (x.ndim - 2) + [(1, 1), (1, 1)], mode="edge")
    h, w = x.shape[-2:]
    shifts = [p[..., i:i + h, j:j + w] for i in range(3) for j in range(3)]
    return np.median(np.stack(shifts, 0), axis=0)


def rating_terms(images) -> dict[str, np.ndarray]:
    """The five terms of :func:`aesthetic_rating`, each per image in [0, 1], plus the raw statistics."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"aesthetic_rating wants images shaped (B, 3, H, W) or (3, H, W) in [0, 1], got {x.shape}")
    x = np.clip(x, 0.0, 1.0)
    hi, lo = x.max(axis=1), x.min(axis=1)
    chroma = hi - lo                                                     # (B, H, W)
    obj = np.clip((chroma - 0.25) / 0.25, 0.0, 1.0)                      # soft object mask: vivid pixels
    bg = 1.0 - obj
    cover = obj.mean(axis=(1, 2))
    size = np.clip(1.0 - ((cover - TARGET_COVER) / TARGET_COVER) ** 2, 0.0, 1.0)
    bg_level = (bg * hi).sum(axis=(1, 2)) / np.maximum(bg.sum(axis=(1, 2)), 1.0)
    clean = np.exp(-bg_level / 0.2)
    grain = np.abs(x - _median3(x)).mean(axis=(1, 2, 3))
    smooth = np.exp(-grain / 0.02)
    vivid_raw = (obj * chroma).sum(axis=(1, 2)) / np.maximum(obj.sum(axis=(1, 2)), 1e-6)
    vivid = np.clip((vivid_raw - 0.4) / 0.4, 0.0, 1.0) * (cover > 0.005)
    h, w = obj.shape[1:]
    ys, xs = (np.arange(h) + 0.5) / h - 0.5, (np.arange(w) + 0.5) / w - 0.5
    mass = np.maximum(obj.sum(axis=(1, 2)), 1e-6)
    cy, cx = (obj.sum(2) * ys).sum(1) / mass, (obj.sum(1) * xs).sum(1) / mass
    centred = np.clip(1.0 - (cx ** 2 + cy ** 2) / 0.3 ** 2, 0.0, 1.0) * (cover > 0.005)
    return {"size": size, "clean": clean, "smooth": smooth, "vivid": vivid, "centred": centred,
            "cover": cover, "bg_level": bg_level, "grain": grain, "chroma": vivid_raw}


def aesthetic_rating(images) -> np.ndarray:
    """The tiny world's hidden "aesthetic" rating, 0 (worst) to 10 (best), computed from pixels alone.

    It is the ground truth that ``models/tiny-aesthetic`` learns to predict from tiny-clip's image
    embedding, as the LAION predictor learns human ratings from CLIP's.  It is defined on any image
    (renders, degraded renders, model samples): ``images`` is (B, 3, H, W) or (3, H, W) in [0, 1]
    (numpy or anything ``np.asarray`` takes); returns float64 (B,).

    With chroma = max(R,G,B) - min(R,G,B) per pixel and the soft object mask
    m = clip((chroma - 0.25) / 0.25, 0, 1) (vivid pixels are objects, the rest background)::

        rating = 3 size + 3 clean + 2 smooth + 1 vivid + 1 centred, each term in [0, 1]

        size    = 1 - ((cover - 0.3) / 0.3)^2, clipped at 0; cover = mean(m): objects should fill
                  about 30 % of the frame (a single small object scores ~0.3, a full frame 0)
        clean   = exp(-bg / 0.2); bg = mean of max(R,G,B) over background (weights 1 - m): a black,
                  untinted background
        smooth  = exp(-grain / 0.02); grain = mean |image - 3x3 median filter|: no pixel noise
        vivid   = clip((mean chroma over objects - 0.4) / 0.4, 0, 1): pure, saturated colour
        centred = 1 - d^2 / 0.3^2, clipped at 0; d = distance of the objects' centre of mass from the
                  image centre in image widths

    vivid and centred are 0 on an image without objects.  Clean renders score about 5-10 (by size and
    placement); noise, blur, tinted or grey backgrounds and shrunken objects lower it.  Every term
    has an easy direction for a fine-tuned model: bigger objects, darker and cleaner background.
    """
    t = rating_terms(images)
    return sum(w * t[k] for k, w in RATING_WEIGHTS.items())
