"""Llama 3.2 1B training MFU on one GPU (H100 / H200) at sequence 4096 and 8192.

Model `config.get("llama3.2-1b")` with bfloat16 compute (float32 master weights and AdamW state), remat policy
"save_dots", the chunked fused loss (`loss_chunk`), attention "cudnn" (falls back to "xla_chunked", recorded in
the results, if cuDNN fused attention cannot compile for the shape). Every row is one document (segment ids 1),
random tokens. For each sequence length: compile, `--warmup` steps, then `--steps` timed steps (median, each
waited for with block_until_ready). MFU = tokens/s × `ModelConfig.flops_per_token(seq)` / peak, against both
the H100's dense bf16 peak (989 TFLOP/s, also the H200's) and a measured peak (best of 10 jitted bf16 8192³
matmuls). Results (with the device kind) go to `--out` as markdown.

    python benchmarks/gpu_train_mfu.py --out benchmarks/gpu_results.md
    python benchmarks/gpu_train_mfu.py --dry-run      # tiny config on CPU: exercises every code path
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import jax
import numpy as np

from llama_jax.data import batch as batch_lib
from llama_jax.model import config
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import step as step_lib
from llama_jax.train import metrics
from llama_jax.train.optim import OptimConfig

H100_BF16_DENSE_PEAK = 989e12


def make_batch(vocab: int, batch: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
            "loss_mask": np.ones((batch, seq), np.int32)}


def run_one(cfg, seq: int, batch: int, loss_chunk: int, steps: int, warmup: int) -> dict:
    ocfg = OptimConfig(peak_lr=3e-4, warmup_steps=10, total_steps=1000)
    mesh = mesh_lib.make_mesh({"data": -1}, devices=jax.devices()[:1])
    rules = rules_lib.get_rules("dp")
    state, shardings = step_lib.init_train_state(cfg, ocfg, mesh, rules, jax.random.key(0))
    step = step_lib.jit_train_step(step_lib.make_train_step(cfg, ocfg, loss_chunk=loss_chunk), mesh, rules,
                                   shardings)
    data = batch_lib.make_global_batch(make_batch(cfg.vocab_size, batch, seq), mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    times, loss = [], float("nan")
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        state, metrics = step(state, data)
        loss = float(jax.block_until_ready(metrics["loss"]))
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}
    del state
    return {"step_s": statistics.median(times), "compile_s": compile_s, "loss": loss,
            "temp_gib": getattr(mem, "temp_size_in_bytes", 0) / 2 ** 30,
            "peak_gib": stats.get("peak_bytes_in_use", 0) / 2 ** 30}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="4096,8192")
    p.add_argument("--tokens-per-step", type=int, default=16384, help="batch = tokens_per_step // seq")
    p.add_argument("--loss-chunk", type=int, default=512)
    p.add_argument("--remat", default="save_dots")
    p.add_argument("--attention", default="cudnn")
    p.add_argument("--fallback-attention", default="xla_chunked")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=400.0, help="skip remaining runs past this wall time")
    p.add_argument("--out", default="benchmarks/gpu_results.md")
    p.add_argument("--dry-run", action="store_true", help="tiny config, short sequences: runs on CPU")
    args = p.parse_args()

    start = time.perf_counter()
    if args.dry_run:
        cfg = config.get("tiny", dtype="bfloat16", remat=args.remat)
        seq_lens, tokens_per_step, matmul_n, steps, warmup = [128, 256], 512, 256, 2, 1
    else:
        cfg = config.get("llama3.2-1b", dtype="bfloat16", remat=args.remat)
        seq_lens = [int(s) for s in args.seq_lens.split(",")]
        tokens_per_step, matmul_n, steps, warmup = args.tokens_per_step, 8192, args.steps, args.warmup
    device = jax.devices()[0]
    kind = f"{device.platform}: {device.device_kind}"
    print(f"device {kind}, jax {jax.__version__}", flush=True)
    peak = metrics.measure_matmul_peak("bfloat16", size=matmul_n, repeats=10)
    print(f"measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)

    rows, notes = [], []
    for seq in seq_lens:
        if time.perf_counter() - start > args.budget_s:
            notes.append(f"seq {seq}: skipped (time budget {args.budget_s:.0f} s spent)")
            continue
        batch = max(1, tokens_per_step // seq)
        result, used = None, None
        for attention in (args.attention, args.fallback_attention):
            try:
                result = run_one(cfg.replace(attention=attention), seq, batch, args.loss_chunk, steps, warmup)
                used = attention
                break
            except Exception as e:  # noqa: BLE001 - record and fall back to the portable backend
                notes.append(f"seq {seq}: attention {attention!r} failed: {type(e).__name__}: "
                             f"{str(e).splitlines()[0][:300] if str(e) else ''}")
                traceback.print_exc()
        if result is None:
            continue
        tps = batch * seq / result["step_s"]
        fpt = cfg.flops_per_token(seq)
        row = (f"| {seq} | {batch} | {used} | {result['step_s'] * 1e3:.0f} | {tps:,.0f} | "
               f"{tps * fpt / H100_BF16_DENSE_PEAK:.1%} | {tps * fpt / peak:.1%} | {result['peak_gib']:.1f} | "
               f"{result['compile_s']:.0f} | {result['loss']:.3f} |")
        print(row, flush=True)
        rows.append(row)

    lines = [f"### Llama 3.2 1B training MFU ({'DRY RUN, tiny config on ' if args.dry_run else ''}{kind})", "",
             f"jax {jax.__version__}; {cfg.name}, bfloat16 compute, float32 master weights + AdamW, remat "
             f"{cfg.remat}, chunked loss ({args.loss_chunk} positions), {tokens_per_step} tokens/step, "
             f"median of {steps} steps after {warmup} warm-up. Measured bf16 matmul peak "
             f"({matmul_n}³): {peak / 1e12:.1f} TFLOP/s; nominal dense bf16 peak 989 TFLOP/s.", "",
             "| seq | batch | attention | step ms | tokens/s | MFU vs 989 TF | MFU vs measured | peak GiB "
             "| compile s | loss |", "|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|", *rows]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
