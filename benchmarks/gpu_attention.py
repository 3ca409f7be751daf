"""Attention backends on one GPU: agreement with a float32 reference and forward+backward time.

Llama 3.2 1B attention shapes (32 query heads, 8 KV heads, head dim 64), bfloat16 inputs, one row of packed
documents (three documents of unequal length, so the document mask matters). For each sequence length and
each backend in `--backends`: the output and the gradients dq, dk, dv of sum(out * w) (w fixed random) are
compared with the "xla" backend run in float32 on the same (upcast) inputs, as the largest absolute error
relative to the reference's largest magnitude; then forward+backward is timed (median of `--repeats` calls
after one warm-up, each waited for). The full-score reference needs O(T²) memory, so it only runs up to
`--max-ref-seq`; longer rows report time only. A backend that fails is recorded with its error, not hidden.

    python benchmarks/gpu_attention.py --out benchmarks/gpu_attention.md
    python benchmarks/gpu_attention.py --dry-run     # CPU, short sequences, portable backends
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import attention
from llama_jax.train import checkpoint as ckpt_lib


def packed_segments(seq: int) -> np.ndarray:
    """Three documents: 1/2, 1/3 and the rest of the row."""
    ids = np.full((1, seq), 3, np.int32)
    ids[:, : seq // 2] = 1
    ids[:, seq // 2: seq // 2 + seq // 3] = 2
    return ids


def loss_and_grads(backend: str):
    def loss(q, k, v, w, seg):
        out = attention.dot_product_attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * w), out

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def rel_err(x, ref) -> float:
    x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", default="2048,8192,32768")
    p.add_argument("--backends", default="cudnn,xla_chunked,xla,xla_blocked")
    p.add_argument("--max-ref-seq", type=int, default=8192)
    p.add_argument("--max-full-seq", type=int, default=8192, help="'xla' (O(T²) memory) runs up to this length")
    p.add_argument("--max-blocked-seq", type=int, default=2048,
                   help="'xla_blocked' (one unrolled block per 128 queries: slow to compile) runs up to this length")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=150.0)
    p.add_argument("--out", default="benchmarks/gpu_attention.md")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args()
    heads, kv_heads, dh, dtype = 32, 8, 64, jnp.bfloat16
    seq_lens = [int(s) for s in args.seq_lens.split(",")]
    backends = args.backends.split(",")
    if args.dry_run:
        heads, kv_heads, seq_lens, backends = 4, 2, [128, 256], ["xla", "xla_blocked", "xla_chunked"]
        args.max_ref_seq = args.max_full_seq = args.max_blocked_seq = 256
    dev = jax.devices()[0]
    kind = f"{dev.platform}: {dev.device_kind}"
    print(f"device {kind}, jax {jax.__version__}", flush=True)
    start = time.perf_counter()
    rows, notes = [], []
    for seq in seq_lens:
        rng = np.random.default_rng(seq)
        q32 = rng.standard_normal((1, seq, heads, dh), np.float32)
        k32 = rng.standard_normal((1, seq, kv_heads, dh), np.float32)
        v32 = rng.standard_normal((1, seq, kv_heads, dh), np.float32)
        w = jnp.asarray(rng.standard_normal((1, seq, heads, dh), np.float32))
        seg = jnp.asarray(packed_segments(seq))
        q, k, v = (jnp.asarray(a, dtype) for a in (q32, k32, v32))
        ref = None
        if seq <= args.max_ref_seq:  # the reference sees the bf16-rounded inputs, in float32
            (_, out_r), grads_r = loss_and_grads("xla")(*(x.astype(jnp.float32) for x in (q, k, v)), w, seg)
            ref = [np.asarray(out_r)] + [np.asarray(g) for g in grads_r]
            del out_r, grads_r
        for backend in backends:
            if ((backend == "xla" and seq > args.max_full_seq)
                    or (backend == "xla_blocked" and seq > args.max_blocked_seq)):
                continue
            if time.perf_counter() - start > args.budget_s:
                notes.append(f"seq {seq} {backend}: skipped (time budget {args.budget_s:.0f} s spent)")
                continue
            fn = loss_and_grads(backend)
            try:
                t0 = time.perf_counter()
                (_, out), grads = jax.block_until_ready(fn(q, k, v, w, seg))
                compile_s = time.perf_counter() - t0
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(q, k, v, w, seg))
                    times.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - record the failure and go on with the next backend
                notes.append(f"seq {seq} {backend}: {type(e).__name__}: {ckpt_lib.first_line(e)}")
                print(notes[-1], flush=True)
                continue
            errs = ("n/a",) * 4
            if ref is not None:
                errs = tuple(f"{rel_err(x, r):.1e}" for x, r in zip([out, *grads], ref))
            # causal attention FLOPs, forward 2 matmuls (x0.5 causal), backward 2.5x forward (incl. recompute)
            flops = 4 * seq * seq * heads * dh * 0.5 * 3.5
            ms = statistics.median(times) * 1e3
            row = (f"| {seq} | {backend} | {ms:.2f} | {flops / (ms / 1e3) / 1e12:.1f} | {' | '.join(errs)} | "
                   f"{compile_s:.1f} |")
            print(row, flush=True)
            rows.append(row)
            del out, grads
            write_report(args, kind, heads, kv_heads, dh, rows, notes)
    write_report(args, kind, heads, kv_heads, dh, rows, notes, echo=True)


def write_report(args, kind, heads, kv_heads, dh, rows, notes, echo: bool = False) -> None:
    """(Re)written after every row, so a run stopped by a time limit keeps what it measured."""
    lines = [f"### Attention backends, forward + backward ({'DRY RUN, ' if args.dry_run else ''}{kind})", "",
             f"jax {jax.__version__}; q heads {heads}, kv heads {kv_heads}, head dim {dh}, bfloat16, batch 1, three "
             f"packed documents; errors are max |x - ref| / max |ref| against 'xla' in float32 on the same inputs; "
             f"time is the median of {args.repeats} forward+backward calls; TFLOP/s counts causal work "
             f"(3.5 x the forward's 2 matmuls over half the square).", "",
             "| seq | backend | fwd+bwd ms | TFLOP/s | err out | err dq | err dk | err dv | first call s |",
             "|--:|---|--:|--:|--:|--:|--:|--:|--:|", *rows]
    if notes:
        lines += ["", "Notes:", *[f"- {n}" for n in notes]]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    if echo:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
