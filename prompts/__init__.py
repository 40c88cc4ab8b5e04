"""Prompt sets: plain text files in this folder (one prompt per line, '#' starts a comment).

``load_prompts(name_or_path)`` takes a set's name (``tiny-train`` = ``prompts/tiny_train.txt``) or a
path to a ``.txt`` file of the user's.
"""
from __future__ import annotations

import os

from bench.errors import BenchError

HERE = os.path.dirname(os.path.abspath(__file__))


def available() -> list[str]:
    return sorted(f[:-4].replace("_", "-") for f in os.listdir(HERE) if f.endswith(".txt"))


def read_prompt_file(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        lines = [line.split("#", 1)[0].strip() for line in f]
    return [line for line in lines if line]


def load_prompts(name_or_path: str) -> list[str]:
    path = os.path.join(HERE, name_or_path.replace("-", "_") + ".txt")
    if not os.path.isfile(path):
        path = name_or_path
    if not os.path.isfile(path):
        raise BenchError(f"unknown prompt set {name_or_path!r}; accepted: {', '.join(available())} "
                         "or a path to a .txt file with one prompt per line")
    prompts = read_prompt_file(path)
    if not prompts:
        raise BenchError(f"prompt set {name_or_path!r} ({path}) holds no prompts; accepted: one prompt per line")
    return prompts
