"""Curation throughput on the embedded corpus with the DirectRunner, 1 and 2 workers.

    PYTHONPATH=. python benchmarks/curation.py --docs=2000 --workdir=/tmp/curation_bench

Writes the corpus sample as jsonl, runs all stages with 1 worker and with 2 (multi_processing), and prints
documents/s, MB/s and the per-stage stats of each run (the second run's output must equal the first's).
"""

import argparse
import json
import os
import time

from llama_jax.data import corpus, curation


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/curation_bench")
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    src = os.path.join(args.workdir, "corpus.jsonl")
    docs = [{"text": t, "id": f"{s}:{rel}"} for s, rel, t in corpus.iter_documents(corpus.stdlib_dir())]
    docs = docs[:: max(1, len(docs) // args.docs)][: args.docs]
    with open(src, "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    mb = os.path.getsize(src) / 1e6
    for workers in (1, 2):
        beam_args = [f"--direct_num_workers={workers}"] + (["--direct_running_mode=multi_processing"]
                                                           if workers > 1 else [])
        start = time.time()
        stats = curation.run(src, os.path.join(args.workdir, f"out{workers}"),
                             pipeline_args=beam_args, overwrite=True)
        wall = time.time() - start
        print(f"workers={workers}: {len(docs)} docs, {mb:.1f} MB in {wall:.1f} s (incl. classifier training): "
              f"{len(docs) / wall:.1f} docs/s, {mb / wall:.2f} MB/s; out {stats['output']['docs']} docs")
        for r in stats["stages"]:
            print(f"  {r['stage']:<12} docs {r['docs_in']:>6} -> {r['docs_out']:>6}  tokens {r['tokens_in']:>9} -> "
                  f"{r['tokens_out']:>9}  {dict((k, v['docs']) for k, v in r['removed'].items())}")


if __name__ == "__main__":
    main()
