"""The compiled train step partitions cleanly under every rule set: XLA's SPMD partitioner never falls back to
"involuntary full rematerialization" (replicating a tensor and re-partitioning it), which at scale means
all-gathering whole activations or, for the embedding table, a 128,256 x 16,384 matrix on every step."""

import jax
import numpy as np
import pytest

from llama_jax.model import config
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import step as step_lib
from llama_jax.train.optim import OptimConfig

OPT = OptimConfig(peak_lr=1e-3, warmup_steps=0, total_steps=100)
B, L = 16, 32
MESHES = {"dp": {"data": 8}, "fsdp": {"data": 2, "fsdp": 4}, "fsdp_tp": {"data": 2, "fsdp": 2, "tensor": 2}}
CASES = [(rules, tie, chunk) for rules in MESHES for tie, chunk in ((False, 0), (True, 16))]


@pytest.mark.parametrize("rules,tie,loss_chunk", CASES,
                         ids=[f"{r}-{'tied' if t else 'untied'}-chunk{c}" for r, t, c in CASES])
def test_train_step_compiles_without_full_rematerialization(capfd, rules, tie, loss_chunk):
    cfg = config.get("tiny", n_layers=2, tie_embeddings=tie)
    mesh = mesh_lib.make_mesh(MESHES[rules])
    r = rules_lib.get_rules(rules)
    state, sh = step_lib.init_train_state(cfg, OPT, mesh, r, jax.random.key(0))
    fn = step_lib.jit_train_step(step_lib.make_train_step(cfg, OPT, loss_chunk=loss_chunk), mesh, r, sh)
    zeros = np.zeros((B, L), np.int32)
    batch = step_lib.make_global_batch(dict(inputs=zeros, targets=zeros, segment_ids=zeros + 1,
                                            positions=zeros, loss_mask=zeros + 1), mesh)
    capfd.readouterr()
    with jax.set_mesh(mesh):
        fn.lower(state, batch).compile()
    err = capfd.readouterr().err
    remats = [line for line in err.splitlines() if "Involuntary full rematerialization" in line]
    assert not remats, f"{len(remats)} full rematerialization(s) under rule set {rules!r}:\n" + "\n".join(
        line[:600] for line in remats[:4])
