"""Mesh construction, rule sets, golden parameter shardings and clear errors."""

import json
import os
import pathlib

import jax
import pytest

from llama_jax import model
from llama_jax.model import config
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib

GOLDEN = pathlib.Path(__file__).parent / "golden"


def test_make_mesh_fills_the_rest():
    m = mesh_lib.make_mesh({"data": 2, "fsdp": -1})
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "context": 1, "tensor": 1}
    assert mesh_lib.batch_divisor(m) == 8
    assert dict(mesh_lib.make_mesh().shape)["data"] == 8


@pytest.mark.parametrize("shape,match", [
    ({"data": 3}, "multiply to the device count"),
    ({"data": 3, "fsdp": -1}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one mesh axis may be -1"),
    ({"pipeline": 2}, "unknown mesh axis name"),
    ({"data": 0}, "must be positive"),
])
def test_bad_mesh_shapes_are_named(shape, match):
    with pytest.raises(ValueError, match=match):
        mesh_lib.make_mesh(shape)


def test_unknown_rule_set():
    with pytest.raises(ValueError, match="unknown sharding rule set 'zero9'"):
        rules_lib.get_rules("zero9")


def test_indivisible_parameter_is_named():
    cfg = config.get("tiny", n_kv_heads=1, n_heads=4)
    m = mesh_lib.make_mesh({"data": 4, "tensor": 2})
    specs = model.param_logical_specs(cfg)
    sh = rules_lib.logical_to_sharding(specs, m, rules_lib.get_rules("fsdp_tp"))
    with pytest.raises(ValueError, match=r"\['wk'\].*not divisible by mesh axes \('tensor',\)"):
        rules_lib.check_divisible(model.param_shapes(cfg), sh)


def _sharding_table(rule_set: str) -> dict:
    cfg = config.get("tiny")
    m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    specs = model.param_logical_specs(cfg)
    sh = rules_lib.logical_to_sharding(specs, m, rules_lib.get_rules(rule_set))
    table = {}
    for (path, spec), s in zip(jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: x is None or
                                                                    isinstance(x, jax.sharding.PartitionSpec)),
                                jax.tree.leaves(sh)):
        table[jax.tree_util.keystr(path)] = f"{tuple(spec)} -> {tuple(s.spec)}"
    return table


@pytest.mark.parametrize("rule_set", sorted(rules_lib.RULE_SETS))
def test_golden_param_shardings(rule_set):
    """Parameter shardings of the tiny model on a 2x2x2 (data, fsdp, tensor) mesh, kept under version control
    so sharding changes show up in review. If a change is intended, regenerate with
    LLAMA_JAX_UPDATE_GOLDEN=1 pytest tests/sharding and commit the JSON diff."""
    table = _sharding_table(rule_set)
    path = GOLDEN / f"tiny_{rule_set}_2x2x2.json"
    if os.environ.get("LLAMA_JAX_UPDATE_GOLDEN"):
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    golden = json.loads(path.read_text())
    assert table == golden, f"parameter shardings for rule set {rule_set!r} changed; see the test docstring"


def test_fsdp_tp_shards_every_matrix():
    table = _sharding_table("fsdp_tp")
    for name, entry in table.items():
        if "norm" in name:
            continue
        mesh_part = entry.split("->")[1]
        assert "'fsdp'" in mesh_part and "'tensor'" in mesh_part, (name, entry)
