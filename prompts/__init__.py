"""Prompt sets: the committed sets in this folder, and loaders for prompt files the user has locally.

Committed sets (plain .txt files, written by the project; ``python -m bench list`` shows them):
``tiny-train`` / ``tiny-eval`` (the tiny world's captions), ``tiny-geneval-train`` (``tiny-train`` without the
captions that name a position: the categories of ``tiny-eval``, for the ``tiny-geneval`` presets),
``simple-animals`` (the 45 animals of the DDPO and AlignProp aesthetic experiments), ``eval-simple-animals``
(AlignProp's 6 held-out animals), ``imagenet-animals`` (ImageNet-1k classes 0-397, whole lines with synonyms:
DDPO's compressibility prompts) and ``nouns-activities`` (every "a/an <animal> <activity>" of DDPO's
prompt-alignment experiment, 45 x 3).

``load_prompts(spec)`` returns a list of prompt strings. ``spec`` is

    NAME_OR_PATH[#FIELD][[START:STOP]]

* ``NAME_OR_PATH``: a committed set's name (``simple-animals`` = ``prompts/simple_animals.txt``; see
  ``available()``) or a path to a file of the user's. The file type comes from the extension:

  ``.txt``      one prompt per line; blank lines and lines starting with ``#`` are skipped (a ``#`` later in a
                line is part of the prompt).
  ``.csv``      a header row and a prompt column; quoted fields may hold commas, quotes and newlines.
  ``.tsv``      the same, tab-separated (e.g. PartiPrompts.tsv, column ``Prompt``).
  ``.json``     a list of strings (HPSv2 benchmark ``anime.json``); a list of objects with a prompt field
                (ImageReward ``benchmark-prompts.json``: ``prompt``; ``refl_data.json``: ``text``); a dict of such
                lists, joined in key order (``hpsv2.benchmark_prompts('all')`` saved as JSON); or a dict keyed by
                prompt whose values are metadata objects (DPOK's DrawBench ``data_meta.json``).
  ``.jsonl``    one JSON string or object with a prompt field per line (GenEval ``evaluation_metadata.jsonl``).
  ``.parquet``  a table with a prompt column (read with pandas).

* ``#FIELD`` names the column (CSV/TSV/parquet), the object field (JSON/JSONL) or the dict key (a dict of lists)
  to read. Without it, the first of ``prompt``, ``prompts``, ``caption``, ``text`` that exists is used, compared
  case-insensitively (so PartiPrompts' ``Prompt`` needs no ``#``). A named field is matched exactly.
* ``[START:STOP]`` keeps prompts START..STOP-1 (Python slice, non-negative, either end may be left out), e.g.
  ``imagenet-animals[:50]``; asking for more prompts than the set holds is an error, not a silent shortening.

Every text file is read as UTF-8 (a leading byte-order mark is ignored). Prompts are stripped of surrounding
whitespace and blank ones are skipped; nothing else is changed or dropped: order is kept and duplicates stay (they
weight sampling; ``duplicates()`` lists them). A set with no prompts is an error. Every problem raises one
``BenchError`` line naming the file, what is wrong and what is accepted.
"""
from __future__ import annotations

import collections
import csv
import io
import json
import os
import re

import pandas as pd

from diffalign.errors import BenchError

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_FIELDS = ("prompt", "prompts", "caption", "text")
EXTENSIONS = (".txt", ".csv", ".tsv", ".json", ".jsonl", ".parquet")
FORMATS = (".txt (one prompt per line), .csv/.tsv/.parquet with a prompt column, .json (a list of strings, "
           "a list of objects with a prompt field, a dict of such lists, or a dict keyed by prompt), "
           ".jsonl (one string or object per line)")
_SPEC = re.compile(r"^(?P<base>.+?)(?:#(?P<field>[^#\[\]]+))?(?:\[(?P<start>\d*):(?P<stop>\d*)\])?$")


def available() -> list[str]:
    return sorted(f[:-4].replace("_", "-") for f in os.listdir(HERE) if f.endswith(".txt"))


def load_prompts(name_or_path: str) -> list[str]:
    """The prompts named by ``NAME_OR_PATH[#FIELD][[START:STOP]]`` (see the module docstring)."""
    base, field, start, stop = _parse(name_or_path)
    path = _resolve(base, name_or_path)
    prompts = _read(path, field)
    if not prompts:
        raise BenchError(f"prompt set {name_or_path!r} ({path}) holds no prompts; accepted: {FORMATS}, "
                         "with at least one non-blank prompt")
    if start is not None:
        prompts = _slice(prompts, start, stop, name_or_path, path)
    return prompts


def duplicates(prompts: list[str]) -> dict[str, int]:
    """Prompts that occur more than once, with their counts (the loaders never de-duplicate)."""
    return {p: n for p, n in collections.Counter(prompts).items() if n > 1}


# --- parsing the spec -------------------------------------------------------------------------------------------

def _parse(spec: str):
    """Split ``NAME_OR_PATH[#FIELD][[START:STOP]]``; a string that is itself an existing file is taken whole."""
    if not isinstance(spec, str) or not spec.strip():
        raise BenchError(f"prompt set {spec!r} is not a name or a path; accepted: {', '.join(available())} "
                         f"or a path to a prompt file ({FORMATS})")
    if os.path.isfile(spec) or _set_file(spec):
        return spec, None, None, None
    m = _SPEC.match(spec)  # always matches: a malformed '[...]' stays in the base and _resolve reports it
    base, field, start, stop = m.group("base", "field", "start", "stop")
    if start is None:
        return base, field, None, None
    return base, field, int(start or 0), int(stop) if stop else None


def _set_file(name: str) -> str | None:
    """The committed set's file for a name like ``simple-animals`` (or ``simple_animals``), if there is one."""
    if "/" in name or os.sep in name:
        return None
    path = os.path.join(HERE, name.replace("-", "_") + ".txt")
    return path if os.path.isfile(path) else None


def _resolve(base: str, spec: str) -> str:
    path = _set_file(base) or (base if os.path.isfile(base) else None)
    if path:
        return path
    if "[" in base or "]" in base:
        raise BenchError(f"prompt set {spec!r}: cannot read its '[...]' suffix; accepted: [START:STOP] with "
                         "non-negative whole numbers, e.g. simple-animals[:10]")
    if "/" in base or os.sep in base or base.endswith(".txt"):  # meant as a file, not a set's name
        raise BenchError(f"prompt file {base!r} not found; accepted: a prompt set name ({', '.join(available())}) "
                         "or an existing .txt file (or .csv, .tsv, .json, .jsonl, .parquet)")
    which = f" (no set or file {base!r})" if base != spec else ""
    raise BenchError(f"unknown prompt set {spec!r}{which}; accepted: {', '.join(available())} "
                     f"or a path to a prompt file ({FORMATS})")


def _slice(prompts: list[str], start: int, stop: int | None, spec: str, path: str) -> list[str]:
    end = len(prompts) if stop is None else stop
    if end > len(prompts) or start >= end:
        raise BenchError(f"prompt set {spec!r} asks for prompts {start}:{end} but {path} holds {len(prompts)}; "
                         f"accepted: [START:STOP] with 0 <= START < STOP <= {len(prompts)}")
    return prompts[start:end]


# --- readers ----------------------------------------------------------------------------------------------------

def _read(path: str, field: str | None) -> list[str]:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise BenchError(f"unknown prompt file type {ext or '(no extension)'!r} for {path}; accepted: {FORMATS}")
    if ext == ".txt":
        if field is not None:
            raise BenchError(f"{path} is a .txt file (one prompt per line) and has no field {field!r}; "
                             "accepted: #FIELD only for .csv, .tsv, .json, .jsonl and .parquet files")
        return read_prompt_file(path)
    if ext == ".parquet":
        return _read_parquet(path, field)
    text = _read_text(path)
    if ext in (".csv", ".tsv"):
        return _read_table(text, "\t" if ext == ".tsv" else ",", path, field)
    if ext == ".jsonl":
        lines = [(f"line {n}", line) for n, line in enumerate(_lines(text), 1) if line.strip()]
        return _prompts([(where, _json(line, path, where)) for where, line in lines], path, field)
    return _from_json(_json(text, path, "the file"), path, field)


def _lines(text: str) -> list[str]:
    """Split at \\n, \\r\\n or \\r only (str.splitlines also splits at form feeds and Unicode separators)."""
    return re.split(r"\r\n|\r|\n", text)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise BenchError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); accepted: UTF-8 files") from None


def read_prompt_file(path: str) -> list[str]:
    """A .txt prompt file: one prompt per line; blank lines and lines starting with '#' (after spaces) are skipped."""
    lines = (line.strip() for line in _lines(_read_text(path)))
    return [line for line in lines if line and not line.startswith("#")]


def _pick(names: list[str], field: str | None, path: str, kind: str) -> str:
    """The column / field / key to read: ``field`` exactly, else the first default name (case-insensitive)."""
    if field is not None:
        if field in names:
            return field
        raise BenchError(f"no {kind} named {field!r} in {path}; {kind}s: {', '.join(map(str, names)) or '(none)'}; "
                         f"accepted: #FIELD naming one of them exactly")
    for want in DEFAULT_FIELDS:
        hits = [n for n in names if isinstance(n, str) and n.strip().lower() == want]
        if len(hits) > 1:
            raise BenchError(f"{path} has several {kind}s named {want!r} ({', '.join(hits)}); "
                             f"accepted: name one with #FIELD, e.g. {path}#{hits[0]}")
        if hits:
            return hits[0]
    raise BenchError(f"no {kind} named 'prompt' in {path}; {kind}s: {', '.join(map(str, names)) or '(none)'}; "
                     f"accepted: a {kind} named {', '.join(DEFAULT_FIELDS)} (any case), or name it with "
                     f"{os.path.basename(path)}#FIELD")


def _text(value, path: str, where: str) -> str | None:
    """A prompt value, stripped; None for a blank or missing one; anything but text is an error."""
    if value is None or (isinstance(value, float) and value != value):  # None / NaN: an empty cell
        return None
    if not isinstance(value, str):
        raise BenchError(f"{path}, {where}: the prompt is {type(value).__name__} {value!r}, not text; "
                         "accepted: prompts as strings")
    return value.strip() or None


def _read_table(text: str, delimiter: str, path: str, field: str | None) -> list[str]:
    rows = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(rows, None)
        if header is None:
            raise BenchError(f"{path} is empty; accepted: a header row naming the columns, then one row per prompt")
        col = header.index(_pick(header, field, path, "column"))
        out = []
        for row in rows:
            value = row[col] if col < len(row) else None
            prompt = _text(value, path, f"row {rows.line_num}")
            if prompt is not None:
                out.append(prompt)
        return out
    except csv.Error as e:
        raise BenchError(f"{path}: malformed {'TSV' if delimiter == chr(9) else 'CSV'} near line {rows.line_num} "
                         f"({e}); accepted: {FORMATS}") from None


def _read_parquet(path: str, field: str | None) -> list[str]:
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise BenchError(f"{path} is not a readable parquet file ({type(e).__name__}: {e}); "
                         "accepted: a parquet table with a prompt column") from None
    col = _pick(list(frame.columns), field, path, "column")
    values = (_text(v, path, f"row {i}") for i, v in enumerate(frame[col].tolist()))
    return [v for v in values if v is not None]


def _json(text: str, path: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: {where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                         f"accepted: {FORMATS}") from None


def _from_json(data, path: str, field: str | None) -> list[str]:
    if isinstance(data, list):
        return _prompts(_numbered(data, "item"), path, field)
    if not isinstance(data, dict) or not data:
        raise BenchError(f"{path} holds {'an empty JSON object' if data == {} else 'a JSON ' + type(data).__name__}; "
                         f"accepted: {FORMATS}")
    if all(isinstance(v, dict) for v in data.values()):
        if field is None and not any(_has_default(o) for o in data.values()):
            return [k.strip() for k in data if k.strip()]  # keyed by prompt (DPOK's DrawBench data_meta.json)
        return _prompts([(f"entry {k!r}", o) for k, o in data.items()], path, field)
    if all(isinstance(v, list) for v in data.values()):
        if field is not None and field in data:  # one key of a dict of lists: 'all.json#anime'
            return _prompts(_numbered(data[field], f"{field!r} item"), path, None)
        return [p for key, items in data.items() for p in _prompts(_numbered(items, f"{key!r} item"), path, field)]
    raise BenchError(f"{path} holds a JSON object whose values are neither all lists nor all objects; "
                     f"accepted: {FORMATS}")


def _numbered(items: list, kind: str) -> list[tuple[str, object]]:
    return [(f"{kind} {i}", item) for i, item in enumerate(items)]


def _has_default(obj: dict) -> bool:
    return any(isinstance(k, str) and k.strip().lower() in DEFAULT_FIELDS for k in obj)


def _prompts(items: list[tuple[str, object]], path: str, field: str | None) -> list[str]:
    """(where, item) pairs -> prompts: each item a string, or an object whose prompt field is read."""
    out = []
    for where, item in items:
        if isinstance(item, dict):
            item = item.get(_pick(list(item), field, f"{path} ({where})", "field"))
        elif field is not None:
            raise BenchError(f"{path}, {where} is a {type(item).__name__}, not an object with a field {field!r}; "
                             "accepted: #FIELD only for objects")
        prompt = _text(item, path, where)
        if prompt is not None:
            out.append(prompt)
    return out
