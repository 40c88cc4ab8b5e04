"""The method contract (diffalign/contract.py), walked over every registered method: each module declares every item
in the contract's shape, one rule per default key, a smoke setting per registered name, a preset per name; the
contract's checker reports a module that drops an item; the harness reads each item and nothing else."""
import ast
import os
import types

import pytest

from bench.core.config import PRESETS, resolve
from diffalign import contract
from diffalign.errors import BenchError
from methods import METHODS, method_module

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _registered_as(module) -> list[str]:
    return [n for n in METHODS if method_module(n) is module]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_registered_method_declares_the_whole_contract(name):
    module = method_module(name)
    assert contract.missing(module, _registered_as(module)) == []
    assert os.path.isfile(os.path.join(PRESETS, f"{name}.yaml")), f"{name}: no preset bench/presets/{name}.yaml"
    cfg = resolve(name, [])  # the defaults and preset pass the method's own rules and cross-key checks
    assert isinstance(module.variant(cfg), str) and module.variant(cfg) == cfg["variant"].split("/full-finetune")[0]
    assert module.data_parallel(cfg, 1) is None  # one process is always possible
    for override in module.SMOKE[name]:
        key = override.split("=", 1)[0]
        section, _, sub = key.partition(".")
        assert section == module.CONFIG_SECTION and sub in module.DEFAULTS, f"{name}: SMOKE sets unknown key {key}"
    resolve(name, module.SMOKE[name])


@pytest.mark.parametrize("item", sorted(contract.REQUIRED))
def test_dropping_any_declared_item_is_reported(item):
    module = method_module("alignprop")
    clone = types.ModuleType("clone")
    clone.__dict__.update({k: v for k, v in vars(module).items() if k != item})
    found = contract.missing(clone, ["alignprop"])
    assert found and found[0].startswith(f"{item}:"), found


def test_a_wrong_shape_a_stray_rule_and_a_missing_smoke_entry_are_reported():
    module = method_module("ddpo")
    clone = types.ModuleType("clone")
    clone.__dict__.update(vars(module))
    clone.NEEDS_DIFFERENTIABLE_REWARD = "no"
    assert contract.missing(clone, ["ddpo"]) == ["NEEDS_DIFFERENTIABLE_REWARD: not of the contract's shape"]
    clone.NEEDS_DIFFERENTIABLE_REWARD = False
    clone.RULES = {**module.RULES, "lrr": contract.LR}
    assert contract.missing(clone, ["ddpo"])[0].startswith("RULES: keys differ from DEFAULTS (['lrr'])")
    clone.RULES = module.RULES
    assert contract.missing(clone, ["ddpo", "ddpo-xl"]) == ["SMOKE: no entry for 'ddpo-xl'"]
    with pytest.raises(TypeError, match="no rule for key 'new_key'"):
        contract.rules({"new_key": 1})
    with pytest.raises(TypeError, match="not in DEFAULTS"):
        contract.rules({"lr": 1e-3}, {"lrr": contract.LR})


def test_a_rule_from_a_method_file_refuses_a_bad_value_with_one_line():
    with pytest.raises(BenchError, match=r"config key 'alignprop.truncation' = 'sideways'; accepted: full, per_step"):
        resolve("alignprop", ["alignprop.truncation=sideways"])
    with pytest.raises(BenchError, match=r"config key 'ogdm.batch_size' = 1; accepted: an integer in 2\.\."):
        resolve("ogdm", ["ogdm.batch_size=1"])


def _imports(path: str) -> list[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
    return out


def test_the_schema_imports_no_method_and_the_harness_reads_no_attribute_outside_the_contract():
    assert not [m for m in _imports(os.path.join(ROOT, "bench", "core", "schema.py")) if m.split(".")[0] == "methods"]
    # the harness reads a method module only through the contract's names (no getattr probing for optional items)
    for d, _, files in os.walk(os.path.join(ROOT, "bench")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(d, f), encoding="utf-8").read()
                assert "DATA_PARALLEL" not in text and 'getattr(method_module' not in text, f
