"""Pipeline parallelism on the simulated 8-device CPU mesh: step time and memory per device of pipe 1 / 2 / 4
(side by side in one run, as ratios to pipe 1), and the schedules' bubble and stash for the paper's meshes.

    python benchmarks/pipeline.py [--steps=5] [--json=results/pipeline.json]

The workload is the `tiny-bench` model (4 layers, d 256, 32K vocabulary) at 32 x 256 tokens per step, float32;
each mesh keeps 8 devices (pipe x data). Memory is XLA's analysis of the compiled step (arguments + outputs -
donated + temporaries); time is the median of `--steps` steps after one warm-up. On one CPU the simulated devices
share the cores, so pipelining cannot be faster here: the numbers show the cost of the schedule's extra work
(bubble ticks computed in lockstep, the backward's recompute) and the memory each stage holds.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from llama_jax.sharding import simulated  # noqa: E402  (imports no JAX)

os.environ.update(simulated.cpu_device_env(8))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from llama_jax import experiment as E  # noqa: E402
from llama_jax.model import config as model_config  # noqa: E402
from llama_jax.sharding import mesh as mesh_lib  # noqa: E402
from llama_jax.sharding import rules as rules_lib  # noqa: E402
from llama_jax.sharding import schedule as schedule_lib  # noqa: E402
from llama_jax.train import step as step_lib  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per mesh (after one warm-up step).")
_JSON = flags.DEFINE_string("json", "", "Also write the results as JSON to this path.")
_CPU = flags.DEFINE_bool("cpu", True, "Measure the CPU meshes (False: only the paper tables, from the planner).")

CASES = [("pipe 1 (data 8)", {"data": 8}, None),
         ("pipe 2 x data 4, 1f1b, M 4", {"pipe": 2, "data": 4}, dict(microbatches=4)),
         ("pipe 2 x data 4, gpipe, M 4", {"pipe": 2, "data": 4}, dict(microbatches=4, schedule="gpipe")),
         ("pipe 4 x data 2, 1f1b, M 4", {"pipe": 4, "data": 2}, dict(microbatches=4)),
         ("pipe 2 x data 4, 1f1b, V 2, M 4", {"pipe": 2, "data": 4}, dict(microbatches=4, virtual=2))]
PAPER = [("405B 8K on 8,192 GPUs (Table 4's mesh), as configured", 16, 4, 16), ("V 1", 16, 1, 16),
         ("V 2", 16, 2, 16), ("V 1, M 32", 16, 1, 32), ("V 2, M 32", 16, 2, 32), ("V 4, M 32", 16, 4, 32)]


def measure(cfg, optim, mesh_shape, pipe_kw, batch):
    mesh = mesh_lib.make_mesh(mesh_shape)
    rules = rules_lib.get_rules("fsdp")
    pipe = schedule_lib.PipelineConfig(stages=mesh_shape.get("pipe", 1), **(pipe_kw or {}))
    state, shardings = step_lib.init_train_state(cfg, optim, mesh, rules, jax.random.key(0))
    step = step_lib.jit_train_step(step_lib.make_train_step(cfg, optim, loss_chunk=256, pipeline=pipe), mesh, rules,
                                   shardings)
    device_batch = {k: jax.device_put(v, mesh_lib.data_sharding(mesh)) for k, v in batch.items()}
    compiled = step.lower(state, device_batch).compile()
    m = compiled.memory_analysis()
    memory = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    state, metrics = step(state, device_batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        state, metrics = step(state, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"seconds_per_step": statistics.median(times), "bytes_per_device": int(memory),
            "temp_bytes": int(m.temp_size_in_bytes), "loss": float(metrics["loss"])}


def main(_):
    cfg = model_config.get("tiny-bench").replace(dtype="float32")
    optim = E.OptimConfig(peak_lr=1e-3, warmup_steps=1, total_steps=100)
    rows, length = 32, 256
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (rows, length + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
             "segment_ids": np.ones((rows, length), np.int32), "loss_mask": np.ones((rows, length), np.int32)}
    results = {"cpu": [], "paper": [], "plans": []}
    main_tables(cfg, optim, batch, results, rows, length)


def main_tables(cfg, optim, batch, results, rows, length):
    if _CPU.value:
        measure_cpu(cfg, optim, batch, results, rows, length)
    paper_tables(results)
    if _JSON.value:
        os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(results, f, indent=1)


def measure_cpu(cfg, optim, batch, results, rows, length):
    base = None
    print(f"{cfg.name}: {rows} x {length} tokens per step, 8 simulated devices, {os.cpu_count()} CPU cores")
    print("| mesh, schedule | s / step | vs pipe 1 | MiB / device (XLA) | vs pipe 1 | loss after 1+steps |")
    print("|---|--:|--:|--:|--:|--:|")
    for name, mesh_shape, pipe_kw in CASES:
        r = measure(cfg, optim, mesh_shape, pipe_kw, batch)
        base = base or r
        results["cpu"].append(dict(name=name, **r))
        print(f"| {name} | {r['seconds_per_step']:.3f} | {r['seconds_per_step'] / base['seconds_per_step']:.2f} | "
              f"{r['bytes_per_device'] / 2 ** 20:.1f} | {r['bytes_per_device'] / base['bytes_per_device']:.2f} | "
              f"{r['loss']:.4f} |", flush=True)


def paper_tables(results):
    print("\n| paper mesh | P | V | M | bubble (table) | (P-1)/(VM+P-1) | inputs kept, first stage | ticks |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    for name, p, v, m in PAPER:
        s = schedule_lib.build(p, v, m, "1f1b")
        row = dict(name=name, stages=p, virtual=v, microbatches=m, bubble=s.bubble(),
                   formula=schedule_lib.bubble_formula(p, v, m), stash=int(max(s.stash)), ticks=s.ticks,
                   gpipe_stash=int(max(schedule_lib.build(p, v, m, "gpipe").stash)))
        results["paper"].append(row)
        print(f"| {name} | {p} | {v} | {m} | {row['bubble']:.3f} | {row['formula']:.3f} | {row['stash']} "
              f"(GPipe {row['gpipe_stash']}) | {s.ticks} |")
    # Table 4's 405B meshes, planned per device at 80 GiB (GiB; the planner's terms, `llama_jax.train.planner`)
    from llama_jax.train import planner  # noqa: PLC0415
    model = model_config.get("llama3.1-405b").replace(dtype="bfloat16", remat="none")
    pipe = schedule_lib.PipelineConfig(stages=16, virtual=4, microbatches=16, lighter_ends=1)
    meshes = [("8K, 8,192 GPUs: TP 8, PP 16, DP 64", dict(data=1, fsdp=64, pipe=16, context=1, tensor=8), 8192, 2048),
              ("8K, 16,384 GPUs: TP 8, PP 16, DP 128", dict(data=1, fsdp=128, pipe=16, context=1, tensor=8), 8192,
               2048),
              ("128K: TP 8, CP 16, PP 16, DP 4", dict(data=1, fsdp=4, pipe=16, context=16, tensor=8), 131072, 128),
              ("128K, the same with full remat", dict(data=1, fsdp=4, pipe=16, context=16, tensor=8), 131072, 128)]
    print("\n| 405B, Table 4 mesh | global batch x seq | bubble | planned GiB per device (80 GiB) | biggest term |")
    print("|---|---|--:|--:|---|")
    for name, mesh, seq, batch in meshes:
        remat = "full" if "full remat" in name else model.remat
        w = planner.Workload(model=model.replace(remat=remat), mesh=mesh, rules="fsdp_tp", seq_len=seq, global_batch=batch,
                             loss_chunk=4096, pipeline=pipe, stage=name)
        p = planner.plan(w, device_memory=80 * 2 ** 30)
        results["plans"].append(dict(name=name, mesh=mesh, seq_len=seq, global_batch=batch, bubble=p.schedule["bubble"],
                                     planned_bytes=p.total, fits=p.fits, biggest=p.biggest))
        print(f"| {name} | {batch} x {seq:,} | {p.schedule['bubble']:.3f} | {p.total / 2 ** 30:.1f} "
              f"({'fits' if p.fits else 'does not fit'}) | {p.biggest} |")


if __name__ == "__main__":
    app.run(main)
