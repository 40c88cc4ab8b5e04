"""The tiny world (diffalign/world.py): the caption grammar and renders that show what the caption says."""
import numpy as np
import pytest

from diffalign import world


def test_grammar_round_trips():
    caps = world.all_captions()
    assert len(caps) == len(set(caps)) == 96
    for c in caps:
        a = world.parse_caption(c)
        assert world.caption(a["colour"], a["shape"], a["count"], a["position"]) == c
    for bad in ["two red circle", "a red circles", "five red circles", "two red circles on the left", "a pink circle"]:
        with pytest.raises(ValueError, match="not a tiny-world caption"):
            world.parse_caption(bad)


def _components(mask):
    """Count 4-connected components (the ground truth a judge has to read)."""
    seen, n = np.zeros_like(mask), 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        n += 1
        stack = [(y, x)]
        while stack:
            cy, cx = stack.pop()
            if 0 <= cy < mask.shape[0] and 0 <= cx < mask.shape[1] and mask[cy, cx] and not seen[cy, cx]:
                seen[cy, cx] = True
                stack += [(cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)]
    return n


def test_renders_show_what_the_caption_says():
    rng = np.random.default_rng(0)
    for _ in range(40):
        s = world.sample_scene(rng)
        img = world.render(s, rng)
        assert img.shape == (32, 32, 3) and 0 <= img.min() and img.max() <= 1
        assert _components(img.max(-1) > 0.5) == s.count
        bright = img[img.max(-1) > 0.5]
        want = np.array(world.COLOURS[s.colour]) / 255
        assert np.abs(bright.mean(0) / bright.mean(0).max() - want / want.max()).max() < 0.25
    s = world.scene_from_caption("a blue square on the left", rng)
    assert s.count == 1 and s.objects[0][0] < 12


