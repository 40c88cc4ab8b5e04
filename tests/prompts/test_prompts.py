"""Prompt sets and prompt-file loaders: committed sets load with their published counts, every file format reads
the shapes real benchmark files have (PartiPrompts TSV, HPSv2 / ImageReward / DrawBench JSON, GenEval JSONL),
and every bad file gives one BenchError line that names the file and what is accepted."""
import json
import os

import pandas as pd
import pytest

from diffalign.errors import BenchError
from prompts import HERE, available, duplicates, load_prompts

SIMPLE_ANIMALS = (
    "cat dog horse monkey rabbit zebra spider bird sheep deer cow goat lion tiger bear raccoon fox wolf lizard beetle "
    "ant butterfly fish shark whale dolphin squirrel mouse rat snake turtle frog chicken duck goose bee pig turkey fly "
    "llama camel bat gorilla hedgehog kangaroo").split()


# --- committed sets ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [
    ("tiny-train", 88), ("tiny-eval", 8), ("simple-animals", 45), ("eval-simple-animals", 6),
    ("imagenet-animals", 398), ("nouns-activities", 135),
])
def test_committed_sets_load_with_their_counts(name, count):
    prompts = load_prompts(name)
    assert len(prompts) == count
    assert all(p == p.strip() and p for p in prompts)


def test_available_lists_every_committed_set():
    assert available() == ["eval-simple-animals", "imagenet-animals", "nouns-activities", "simple-animals",
                           "tiny-eval", "tiny-geneval-train", "tiny-train"]
    assert load_prompts("simple_animals") == load_prompts("simple-animals")  # file-name spelling works too


def test_tiny_geneval_train_is_tiny_train_without_positions_and_no_eval_prompt():
    train, sub = load_prompts("tiny-train"), load_prompts("tiny-geneval-train")
    assert sub == [p for p in train if " on the " not in p] and len(sub) == 40
    assert not set(sub) & set(load_prompts("tiny-eval"))


def test_simple_animals_and_held_out_animals():
    assert load_prompts("simple-animals") == SIMPLE_ANIMALS
    assert load_prompts("eval-simple-animals") == ["snail", "hippopotamus", "cheetah", "crocodile", "lobster",
                                                   "octopus"]
    assert not set(load_prompts("eval-simple-animals")) & set(SIMPLE_ANIMALS)


def test_imagenet_animals_are_classes_0_to_397_whole_lines():
    prompts = load_prompts("imagenet-animals")
    assert prompts[0] == "tench, Tinca tinca"
    assert prompts[1] == "goldfish, Carassius auratus"
    assert prompts[151] == "Chihuahua"  # the first dog class
    assert prompts[291] == "lion, king of beasts, Panthera leo"
    assert prompts[319].startswith("dragonfly, darning needle, devil's darning needle,")
    assert prompts[397] == "puffer, pufferfish, blowfish, globefish"
    assert duplicates(prompts) == {}
    # no line was cut by the comment character: every non-comment line of the file is a prompt, intact
    with open(os.path.join(HERE, "imagenet_animals.txt"), encoding="utf-8") as f:
        body = [line.rstrip("\n") for line in f if not line.startswith("#")]
    assert body == prompts


def test_nouns_activities_is_the_full_product():
    prompts = load_prompts("nouns-activities")
    assert prompts[:3] == ["a cat washing the dishes", "a cat riding a bike", "a cat playing chess"]
    assert "an ant riding a bike" in prompts
    assert len(set(prompts)) == 45 * 3


def test_slices():
    assert load_prompts("imagenet-animals[:50]") == load_prompts("imagenet-animals")[:50]
    assert load_prompts("simple-animals[40:]") == SIMPLE_ANIMALS[40:]
    assert load_prompts("simple-animals[2:4]") == ["horse", "monkey"]
    with pytest.raises(BenchError, match=r"asks for prompts 0:50 but .* holds 45"):
        load_prompts("simple-animals[:50]")
    with pytest.raises(BenchError, match="holds 45"):
        load_prompts("simple-animals[5:5]")
    with pytest.raises(BenchError, match=r"cannot read its '\[...\]' suffix"):
        load_prompts("simple-animals[-3:]")


# --- user files -------------------------------------------------------------------------------------------------

def write(tmp_path, name, text, encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return str(path)


def test_txt_bom_blank_lines_comments_and_inline_hash(tmp_path):
    path = write(tmp_path, "p.txt", "\ufeff# a comment\n\na red cat\r\n   \n  # indented comment\n"
                                    "a poster saying #1, bold  \n\ttwo dogs\n")
    assert load_prompts(path) == ["a red cat", "a poster saying #1, bold", "two dogs"]


def test_csv_quoted_commas_quotes_newlines_and_bom(tmp_path):
    path = write(tmp_path, "p.csv", '\ufeffid,Prompt,category\n1,"a cat, a dog","x"\n2,"say ""hi"", please",y\n'
                                    '3,"two\nlines",z\n4,,blank\n5,  padded  ,w\n6,42,number\n')
    assert load_prompts(path) == ["a cat, a dog", 'say "hi", please', "two\nlines", "padded", "42"]
    assert load_prompts(path + "#category") == ["x", "y", "z", "blank", "w", "number"]
    assert load_prompts(path + "#Prompt[1:3]") == ['say "hi", please', "two\nlines"]


def test_tsv_like_partiprompts(tmp_path):
    rows = ["Prompt\tCategory\tChallenge\tNote", "bond\tAbstract\tBasic\tBiology-inspired concepts",
            '42\tAbstract\tBasic\t', 'A robot on a wall. The words "Fly an airplane" are written.\tOutdoor\tComplex\t',
            "a cat, sitting\tAnimals\tBasic\t"]
    path = write(tmp_path, "PartiPrompts.tsv", "\n".join(rows) + "\n")
    assert load_prompts(path) == ["bond", "42", 'A robot on a wall. The words "Fly an airplane" are written.',
                                  "a cat, sitting"]
    assert load_prompts(path + "#Category") == ["Abstract", "Abstract", "Outdoor", "Animals"]


def test_json_shapes(tmp_path):
    # HPSv2 benchmark style file: a list of strings
    assert load_prompts(write(tmp_path, "anime.json", json.dumps(["a", " b ", ""]))) == ["a", "b"]
    # ImageReward benchmark-prompts.json: objects with id + prompt; refl_data.json: objects with text + image
    objs = [{"id": "005695-0057", "prompt": "a concept art, cyberpunk"}, {"id": "x", "prompt": "a cute cat"}]
    assert load_prompts(write(tmp_path, "bench.json", json.dumps(objs))) == ["a concept art, cyberpunk", "a cute cat"]
    refl = [{"text": "with # e 0 a 3 7 a skin color ", "image": "000093-0017"}]
    assert load_prompts(write(tmp_path, "refl.json", json.dumps(refl))) == ["with # e 0 a 3 7 a skin color"]
    # hpsv2.benchmark_prompts('all') saved as JSON: a dict of lists, joined in key order, or one key picked
    styles = {"anime": ["a1", "a2"], "photo": ["p1"]}
    path = write(tmp_path, "all.json", json.dumps(styles))
    assert load_prompts(path) == ["a1", "a2", "p1"]
    assert load_prompts(path + "#photo") == ["p1"]
    # DPOK DrawBench data_meta.json: keyed by prompt, values are metadata objects
    meta = {"A red colored car.": {"category": "Colors"}, "Two cars on the street.": {"category": "Counting"}}
    assert load_prompts(write(tmp_path, "data_meta.json", json.dumps(meta))) == ["A red colored car.",
                                                                                "Two cars on the street."]
    # a dict of objects that do carry a prompt field reads that field, not the keys
    keyed = {"0": {"prompt": "zero"}, "1": {"prompt": "one"}}
    assert load_prompts(write(tmp_path, "keyed.json", json.dumps(keyed))) == ["zero", "one"]


def test_jsonl_like_geneval(tmp_path):
    lines = ['{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
             "", '"a bare string"', '{"tag": "counting", "prompt": "a photo of four dogs"}']
    path = write(tmp_path, "evaluation_metadata.jsonl", "\ufeff" + "\n".join(lines) + "\n")
    assert load_prompts(path) == ["a photo of a bench", "a bare string", "a photo of four dogs"]


def test_parquet_prompt_column(tmp_path):
    path = str(tmp_path / "pick.parquet")
    pd.DataFrame({"caption": ["a cat", None, "a dog"], "best_image_uid": ["u1", "u2", "u3"]}).to_parquet(path)
    assert load_prompts(path) == ["a cat", "a dog"]
    assert load_prompts(path + "#best_image_uid[1:]") == ["u2", "u3"]


def test_duplicates_are_kept_and_reported(tmp_path):
    path = write(tmp_path, "dup.txt", "a cat\na dog\na cat\n")
    prompts = load_prompts(path)
    assert prompts == ["a cat", "a dog", "a cat"]
    assert duplicates(prompts) == {"a cat": 2}


def test_path_with_hash_or_brackets_in_its_name_is_taken_whole(tmp_path):
    path = write(tmp_path, "set#1[v2].txt", "a cat\n")
    assert load_prompts(path) == ["a cat"]


# --- errors -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,text,match", [
    ("p.csv", "id,category\n1,x\n", r"no column named 'prompt' in .*p\.csv; columns: id, category; accepted: "),
    ("p.tsv", "", r"p\.tsv is empty; accepted: a header row"),
    ("p.csv", "prompt\n\n ,\n", r"holds no prompts"),
    ("p.txt", "# only a comment\n\n", r"holds no prompts"),
    ("p.json", "[]", r"holds no prompts"),
    ("p.json", '{"a": 1}', r"neither all lists nor all objects; accepted: "),
    ("p.json", '[{"id": 1}]', r"no field named 'prompt' in .*p\.json \(item 0\); fields: id"),
    ("p.json", '["ok", 7]', r"p\.json, item 1: the prompt is int 7, not text"),
    ("p.json", "[1, 2", r"p\.json: the file is not valid JSON"),
    ("p.jsonl", '{"prompt": "a"}\n{bad\n', r"p\.jsonl: line 2 is not valid JSON"),
    ("p.csv", "Prompt,prompt\na,b\n", r"several columns named 'prompt' \(Prompt, prompt\)"),
    ("p.xlsx", "x", r"unknown prompt file type '\.xlsx' for .*; accepted: \.txt"),
    ("p", "x", r"unknown prompt file type '\(no extension\)'"),
])
def test_bad_files_give_one_clear_line(tmp_path, name, text, match):
    path = write(tmp_path, name, text)
    with pytest.raises(BenchError, match=match) as e:
        load_prompts(path)
    assert "\n" not in str(e.value) and os.path.basename(path) in str(e.value)


def test_bad_names_and_fields(tmp_path):
    with pytest.raises(BenchError, match=r"unknown prompt set 'no-such-set'; accepted: eval-simple-animals, "):
        load_prompts("no-such-set")
    with pytest.raises(BenchError, match=r"unknown prompt set 'x\.csv#Prompt' \(no set or file 'x\.csv'\)"):
        load_prompts("x.csv#Prompt")
    path = write(tmp_path, "p.csv", "prompt\na\n")
    with pytest.raises(BenchError, match=r"no column named 'Prompt' in .*; columns: prompt; accepted: #FIELD"):
        load_prompts(path + "#Prompt")  # a named field is matched exactly
    with pytest.raises(BenchError, match=r"has no field 'x'; accepted: #FIELD only for"):
        load_prompts("simple-animals#x")
    with pytest.raises(BenchError, match="not UTF-8 text"):
        load_prompts(write(tmp_path, "latin.txt", "caf\u00e9\n", encoding="latin-1"))
    with pytest.raises(BenchError, match="not a readable parquet file"):
        load_prompts(write(tmp_path, "fake.parquet", "not parquet"))
