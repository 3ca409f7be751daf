"""Curation throughput on the embedded corpus with the DirectRunner, 1 and 2 workers.

    PYTHONPATH=. python benchmarks/curation.py --docs=0 --workdir=/tmp/curation_bench

Writes the embedded corpus (Python standard-library code and docstring documents, :mod:`llama_jax.data.corpus`;
``--docs=N`` takes every k-th document to keep about N, 0 takes all) as jsonl, runs all stages with the default
config with 1 worker (in memory) and with 2 (multi_processing), checks that both runs wrote byte-identical shards,
and prints the load average, documents/s, MB/s (input jsonl bytes) and the per-stage stats of each run. Wall time
includes fitting the quality classifier in the launching process. Each run's ``stats.json`` stays in the workdir.
"""

import argparse
import glob
import json
import os
import time

from llama_jax.data import corpus, curation


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=0, help="about this many documents (every k-th); 0: all")
    ap.add_argument("--workdir", default="/tmp/curation_bench")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "corpus.jsonl")
    docs = [{"text": t, "id": f"{s}:{rel}"} for s, rel, t in corpus.iter_documents(corpus.stdlib_dir())]
    if args.docs > 0:
        docs = docs[:: max(1, len(docs) // args.docs)][: args.docs]
    with open(src, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    mb = os.path.getsize(src) / 1e6
    print(f"input: {len(docs)} documents, {mb:.1f} MB; load average {os.getloadavg()} on {os.cpu_count()} CPUs")
    outputs = []
    for workers in (1, 2):
        beam_args = [f"--direct_num_workers={workers}"] + (["--direct_running_mode=multi_processing"]
                                                           if workers > 1 else [])
        out = os.path.join(args.workdir, f"out{workers}")
        start = time.time()
        stats = curation.run(src, out, pipeline_args=beam_args, overwrite=True)
        wall = time.time() - start
        outputs.append(out)
        print(f"workers={workers}: {wall:.1f} s (pipeline {stats['seconds']:.1f} s), {len(docs) / wall:.1f} docs/s, "
              f"{mb / wall:.3f} MB/s; out {stats['output']['docs']} docs, {stats['output']['tokens']} "
              f"{stats['token_unit']}; load average {os.getloadavg()}")
        for r in stats["stages"]:
            print(f"  {r['stage']:<12} docs {r['docs_in']:>5} -> {r['docs_out']:>5}  {stats['token_unit']} "
                  f"{r['tokens_in']:>8} -> {r['tokens_out']:>8}  {dict((k, v['docs']) for k, v in r['removed'].items())}")
    shards = [sorted(glob.glob(os.path.join(o, "part-*.array_record"))) for o in outputs]
    same = [os.path.basename(p) for p in shards[0]] == [os.path.basename(p) for p in shards[1]] and all(
        open(a, "rb").read() == open(b, "rb").read() for a, b in zip(*shards))
    print(f"1 and 2 workers wrote identical shards: {same}")


if __name__ == "__main__":
    main()
