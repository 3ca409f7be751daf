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
    assert dict(m.shape) == {"data": 2, "fsdp": 4, "pipe": 1, "context": 1, "tensor": 1}
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


def test_global_batch_check_names_the_batch_the_divisor_and_what_to_change():
    mesh_lib.check_global_batch(24, devices=4, shards=2, grad_accum=3, roles=2)
    with pytest.raises(ValueError, match=r"global batch size 12 is not divisible by data x fsdp = 8 devices of mesh "
                                         r"\{'data': 8\}: use a multiple of 8 as the global batch"):
        mesh_lib.check_global_batch(12, devices=8, mesh={"data": 8})
    with pytest.raises(ValueError, match="8 devices times grad_accum=4: use a multiple of 32 .* or grad_accum"):
        mesh_lib.check_global_batch(16, devices=8, grad_accum=4)
    with pytest.raises(ValueError, match=r"global batch 6 is not divisible by the 4 data shards \(data.host_shards\)"):
        mesh_lib.check_global_batch(6, shards=4)
    with pytest.raises(ValueError, match="stage 'dpo': 9 rows per data shard must hold 3 roles x a multiple of "
                                         "grad_accum=2 .*multiple of 6"):
        mesh_lib.check_global_batch(9, roles=3, grad_accum=2, where="stage 'dpo'")
    with pytest.raises(ValueError, match="global batch must be >= 1, got 0"):
        mesh_lib.check_global_batch(0, devices=8)


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
