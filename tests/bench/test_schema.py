"""The config schema (bench/core/schema.py), as a property: for every key of the common config and of every method's
section, bad values of every kind (wrong type, zero, negative, NaN, infinity, huge, empty, unknown choice) end in one
``error:`` line naming the key, and a value the schema accepts never ends in anything but a run config or such a
line.  The number of cases tried is printed (the README quotes it)."""
import math
import os

import pytest
from conftest import error_line

from bench.core import schema
from bench.core.config import COMMON, resolve
from diffalign.errors import BenchError
from methods import METHODS, method_module

DERIVED = {"method", "variant", "method_key"}  # set by resolve, not by the user


def _keys(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _keys(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _yaml(v) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ",".join(_yaml(x) for x in v) + "]"
    return str(v)


BAD = {"wrong type (text)": "abc", "wrong type (number)": 3, "wrong type (list)": [1, 2], "zero": 0, "zero (real)": 0.0,
       "negative": -1, "negative (real)": -0.5, "NaN": float("nan"), "infinity": float("inf"), "huge": 10 ** 12,
       "huge (real)": 1e30, "empty": "", "empty list": [], "unknown choice": "nope", "a null": None}


def _rule(key: str, section: str):
    if key.startswith(section + "."):
        module = next(method_module(m) for m in METHODS if method_module(m).CONFIG_SECTION == section)
        return module.RULES[key.split(".", 1)[1]]
    return schema.COMMON[key]


def _coerce(default, value):
    """What the typed merge hands the schema (an int for a real key becomes a float), or None if it refuses."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        return value if isinstance(value, bool) else None
    if isinstance(default, float):
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if isinstance(default, int):
        return value if isinstance(value, int) and not isinstance(value, bool) else None
    return value if isinstance(value, type(default)) else None


def test_every_key_of_every_method_has_a_rule():
    for name in METHODS:
        module = method_module(name)
        assert set(module.RULES) == set(module.DEFAULTS), name
    assert {k for k, _ in _keys(COMMON)} - DERIVED <= set(schema.COMMON)


def test_bad_values_for_every_key_are_one_line_naming_it(capsys):
    tried = refused = 0
    sections = {}
    for name in sorted(METHODS):
        sections.setdefault(method_module(name).CONFIG_SECTION, name)
    for section, method in sorted(sections.items()):
        defaults = {**COMMON, section: method_module(method).DEFAULTS}
        for key, default in _keys(defaults):
            if key in DERIVED or (key.split(".")[0] != section and section != "alignprop"):
                continue  # the common keys once (with alignprop), each section's own keys with its method
            rule = _rule(key, section)
            for kind, bad in BAD.items():
                tried += 1
                # what the typed merge passes on to the schema (keys whose default is null take any type)
                typed = bad if default is None or bad is None else _coerce(default, bad)
                expect_refusal = (typed is None and bad is not None) or rule.error(typed) is not None
                try:
                    resolve(method, [f"{key}={_yaml(bad)}"])
                except BenchError as e:
                    message = str(e)
                    assert "\n" not in message, (key, kind, message)
                    if expect_refusal:  # the schema's own line names the key and what it accepts
                        assert repr(key) in message and "accepted" in message, (key, kind, message)
                    refused += 1
                    continue
                except Exception as e:  # any other exception is a defect: bad input must be one clear line
                    pytest.fail(f"{key}={_yaml(bad)} ({kind}) raised {type(e).__name__}: {e}")
                assert not expect_refusal, f"{key}={_yaml(bad)} ({kind}) was accepted; the rule says {rule}"
    print(f"schema property test: {tried} bad values tried over every key of every method, {refused} refused")
    assert tried > 1500 and refused > 0.8 * tried


def test_a_bad_value_through_the_cli_is_one_line_exit_2_and_no_run_folder(capsys, tmp_path):
    out = str(tmp_path / "run")
    for argv, expected in [(["lora.rank=-1"], "'lora.rank' = -1; accepted: an integer in 1..1024"),
                           (["alignprop.lr=nan"], "'alignprop.lr' = nan; accepted: a finite number in (0, 10]"),
                           (["eval.num_seeds=1e9"], "accepted: an integer"),
                           (["alignprop.adam_betas=[0.9]"], "a list of two betas, each in [0, 1)"),
                           (["sampler.eta=2"], "'sampler.eta' = 2.0; accepted: a finite number in [0, 1]")]:
        line = error_line(capsys, ["run", "--method", "alignprop", "--out", out, "--set"] + argv)
        assert expected in line, line
        assert not os.path.exists(out)
