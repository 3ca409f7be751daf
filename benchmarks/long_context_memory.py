"""Ahead-of-time peak memory of one long-context training step on a simulated context (x fsdp) mesh.

    python benchmarks/long_context_memory.py [--preset=llama3.1-8b] [--seq_len=131072] [--context=8] [--fsdp=1]

Compiles the sharded train step (context-parallel attention under `jax.shard_map`, blockwise "xla_chunked"
attention, full remat of every block, the chunked loss, bfloat16 compute, float32 master weights + AdamW) for
`fsdp` sequences of `seq_len` tokens (one per fsdp group) with abstract shapes only (nothing is allocated), on
`context x fsdp` simulated CPU devices, and prints XLA's per-device memory analysis. Parameters and optimizer
state are sharded over fsdp *and* context (FSDP over every device, as long-context runs do), so the figure is
arguments (state + batch) + temporaries per device.
"""
import argparse
import json
import os
import sys

p = argparse.ArgumentParser()
p.add_argument("--preset", default="llama3.1-8b")
p.add_argument("--seq_len", type=int, default=131_072)
p.add_argument("--context", type=int, default=8)
p.add_argument("--fsdp", type=int, default=1)
p.add_argument("--loss_chunk", type=int, default=4096)
p.add_argument("--attention", default="xla_chunked")
p.add_argument("--layers", type=int, default=0, help="override n_layers (0 = the preset)")
args = p.parse_args()
n = args.context * args.fsdp
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax.model import config  # noqa: E402
from llama_jax.sharding import mesh as mesh_lib  # noqa: E402
from llama_jax.sharding import rules as rules_lib  # noqa: E402
from llama_jax.train import step as step_lib  # noqa: E402
from llama_jax.train.optim import OptimConfig  # noqa: E402

cfg = config.get(args.preset, dtype="bfloat16", remat="full", attention=args.attention)
if args.layers:
    cfg = cfg.replace(n_layers=args.layers)
mesh = mesh_lib.make_mesh({"fsdp": args.fsdp, "context": args.context})
# FSDP over both data-parallel-like axes: weights sharded along `embed` over (fsdp, context)
rules = tuple((k, ("fsdp", "context")) if k == "embed" else (k, v) for k, v in rules_lib.get_rules("fsdp"))
opt = OptimConfig(warmup_steps=10, total_steps=100)
state = step_lib.abstract_train_state(cfg, opt, mesh, rules)
shape = (args.fsdp, args.seq_len)
batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=mesh_lib.data_sharding(mesh))
         for k in step_lib.BATCH_KEYS}
fn = step_lib.jit_train_step(step_lib.make_train_step(cfg, opt, loss_chunk=args.loss_chunk), mesh, rules,
                             jax.tree.map(lambda s: s.sharding, state))
with jax.set_mesh(mesh):
    compiled = fn.lower(state, batch).compile()
m = compiled.memory_analysis()
gib = 2 ** 30
out = {"preset": cfg.name, "seq_len": args.seq_len, "mesh": dict(mesh.shape), "devices": n,
       "argument_GiB": round(m.argument_size_in_bytes / gib, 2), "output_GiB": round(m.output_size_in_bytes / gib, 2),
       "alias_GiB": round(m.alias_size_in_bytes / gib, 2), "temp_GiB": round(m.temp_size_in_bytes / gib, 2),
       "peak_GiB": round((m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                          + m.temp_size_in_bytes) / gib, 2)}
print(json.dumps(out))
