"""Data pipeline throughput: packed training tokens per second on the embedded corpus.

Runs the training iterator of :mod:`llama_jax.data.pipeline` (embedded stdlib corpus, code 0.7 / prose 0.3,
default 4096-id tokenizer) at seq_len 512, global batch 8, with 0 (in-process), 1 and N worker processes, and
prints a table of tokens/s (``batch * seq_len`` per batch; padding is never produced in training). The first
batches (worker start-up) are excluded from the timing.

    python benchmarks/data_pipeline.py --workdir=/tmp/llama_jax_bench [--workers=0,1,2] [--batches=1000]
"""

from __future__ import annotations

import argparse
import os
import time

from llama_jax.data import corpus, pipeline


def measure(cfg, tokenizer, seq_len: int, batch: int, batches: int, warmup: int) -> tuple[float, float]:
    """Returns (start-up seconds, tokens/s over ``batches`` batches after ``warmup``)."""
    start = time.perf_counter()
    it = pipeline.make_train_iterator(cfg, tokenizer, seq_len, batch, seed=0, process_index=0, process_count=1)
    for _ in range(warmup):
        next(it)
    startup = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    elapsed = time.perf_counter() - start
    if cfg["num_workers"]:
        it.close()
    return startup, batches * batch * seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/llama_jax_bench")
    parser.add_argument("--workers", default=f"0,1,{min(os.cpu_count() or 1, 8)}")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    start = time.perf_counter()
    tokenizer = corpus.default_tokenizer(args.workdir)
    print(f"corpus + tokenizer ready in {time.perf_counter() - start:.1f} s (cached after the first run)")
    rows = []
    for workers in sorted({int(w) for w in args.workers.split(",")}):
        cfg = pipeline.embedded_corpus_config(args.workdir)
        cfg["num_workers"] = workers
        startup, tps = measure(cfg, tokenizer, args.seq_len, args.batch, args.batches, args.warmup)
        rows.append((workers, startup, tps))
    print(f"\nseq_len={args.seq_len} batch={args.batch} batches={args.batches} cpus={os.cpu_count()}")
    print(f"{'workers':>8} | {'start-up s':>10} | {'tokens/s':>10} | {'batches/s':>9}")
    print(f"{'-' * 8}-+-{'-' * 10}-+-{'-' * 10}-+-{'-' * 9}")
    for workers, startup, tps in rows:
        print(f"{workers:>8} | {startup:>10.1f} | {tps:>10,.0f} | {tps / (args.batch * args.seq_len):>9.1f}")


if __name__ == "__main__":
    main()
