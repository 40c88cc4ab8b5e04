"""Real (image, caption) data (diffalign/realdata.py): the tiny world's stream, folders and parquet files, and one
error line for each kind of bad input."""
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from diffalign import world
from diffalign.errors import BenchError
from diffalign.realdata import load_real_data

TRAIN = ["a red circle", "two blue squares", "three green triangles"]


def _png(colour=(255, 0, 0), size=16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_tiny_world_stream_renders_the_train_captions_repeatably():
    data = load_real_data("tiny-world", TRAIN)
    a = data.draw(8, torch.Generator().manual_seed(3))
    b = data.draw(8, torch.Generator().manual_seed(3))
    assert a[0] == b[0] and torch.equal(a[1], b[1])  # the run's generator makes the data: resumable
    assert set(a[0]) <= set(TRAIN) and a[1].shape == (8, 3, 32, 32) and 0 <= float(a[1].min()) <= float(a[1].max()) <= 1
    # each render shows its caption: the colour of its brightest pixels is the caption's colour
    for caption, img in zip(*a):
        colour = world.parse_caption(caption)["colour"]
        rgb = img.flatten(1)[:, img.flatten(1).sum(0).argmax()]
        ref = torch.tensor(world.COLOURS[colour], dtype=torch.float32) / 255
        assert (rgb - ref).abs().max() < 0.1
    with pytest.raises(BenchError, match="renders tiny-world captions, but the train prompts hold 'a cat'"):
        load_real_data("tiny-world", ["a cat"])


def test_folders_with_metadata_or_caption_files_and_parquet_files(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "a.png").write_bytes(_png((255, 0, 0)))
    (meta / "b.png").write_bytes(_png((0, 0, 255)))
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red thing"}) + "\n"
                                         + json.dumps({"file_name": "b.png", "caption": "a blue thing"}) + "\n")
    data = load_real_data(str(meta), [], size=8)
    assert data.captions == ["a red thing", "a blue thing"] and data.images.shape == (2, 3, 8, 8)
    assert data.images[0, 0].mean() == pytest.approx(1.0) and data.images[1, 2].mean() == pytest.approx(1.0)
    side = tmp_path / "side"
    side.mkdir()
    (side / "x.jpg").write_bytes(_png())
    (side / "x.txt").write_text("a red square\n")
    assert load_real_data(str(side), [], size=8).captions == ["a red square"]
    pq = tmp_path / "real.parquet"
    pd.DataFrame({"image": [{"bytes": _png(), "path": None}, {"bytes": _png((0, 255, 0)), "path": None}],
                  "prompt": ["r", "g"]}).to_parquet(pq)  # datasets' Image feature
    plain = tmp_path / "plain.parquet"
    pd.DataFrame({"jpg": [_png()], "text": ["bytes"]}).to_parquet(plain)
    assert load_real_data(str(plain), [], size=4).captions == ["bytes"]
    data = load_real_data(str(pq), [], size=4)
    assert data.captions == ["r", "g"] and data.images.shape == (2, 3, 4, 4)
    captions, images = data.draw(5, torch.Generator().manual_seed(0))
    assert len(captions) == 5 and images.shape == (5, 3, 4, 4)


def test_bad_real_data_gives_one_line_naming_what_is_accepted(tmp_path):
    def err(spec) -> str:
        with pytest.raises(BenchError) as e:
            load_real_data(str(spec), [], size=8)
        return str(e.value)

    assert "does not exist; accepted: tiny-world" in err(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    assert "holds no image" in err(tmp_path / "empty")
    nocap = tmp_path / "nocap"
    nocap.mkdir()
    (nocap / "a.png").write_bytes(_png())
    assert "image 'a.png' has no caption" in err(nocap)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"not a png")
    (broken / "a.txt").write_text("x")
    assert "cannot decode the image" in err(broken)
    badjson = tmp_path / "badjson"
    badjson.mkdir()
    (badjson / "metadata.jsonl").write_text("{oops\n")
    assert "is not JSON" in err(badjson)
    pd.DataFrame({"pixels": [b""], "caption": ["x"]}).to_parquet(tmp_path / "cols.parquet")
    assert "has columns ['caption', 'pixels']; accepted:" in err(tmp_path / "cols.parquet")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    assert "cannot be read" in err(tmp_path / "junk.parquet")
    (tmp_path / "x.csv").write_text("a,b\n")
    assert "is not a .parquet file" in err(tmp_path / "x.csv")
