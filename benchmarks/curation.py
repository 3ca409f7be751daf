"""Curation throughput on the embedded corpus with the DirectRunner, 1 and 2 workers.

    PYTHONPATH=. python benchmarks/curation.py --docs=0 --workdir=/tmp/curation_bench

Writes the embedded corpus (Python standard-library code and docstring documents, :mod:`llama_jax.data.corpus`;
``--docs=N`` takes every k-th document to keep about N, 0 takes all) as jsonl, runs all stages with the default
config with 1 worker (in memory) and with 2 (multi_processing), checks that both runs wrote byte-identical shards,
and prints the load average, documents/s, MB/s (input jsonl bytes) and the per-stage stats of each run. Wall time
includes fitting the quality classifier in the launching process. Each run's ``stats.json`` stays in the workdir.

    PYTHONPATH=. python benchmarks/curation.py --docs=0 --workdir=/tmp/curation_bench --compare=REV

instead runs the same input through git revision ``REV``'s code (exported with ``git archive``) and through this
tree's, one process each, 1 worker, and prints the CPU seconds of each (user + system of the whole process,
imports included: the machine may be shared, so CPU time, not wall time, is compared), documents per CPU second,
whether the per-stage stats are equal and whether the shards are byte-identical. This tree runs twice: with an
empty quality-classifier cache (fitted, as every run of an older revision does) and with the cache it left. Then
both run every stage but ``near_dedup`` (whose MinHash hashing may differ between revisions, and with it which
documents the later stages see), so that the shards show whether everything else is byte-identical.
"""

import argparse
import glob
import json
import os
import resource
import shutil
import subprocess
import sys
import time

from llama_jax.data import corpus, curation


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=0, help="about this many documents (every k-th); 0: all")
    ap.add_argument("--workdir", default="/tmp/curation_bench")
    ap.add_argument("--compare", default="", help="a git revision to compare with this tree (CPU seconds)")
    ap.add_argument("--one", nargs=4, metavar=("INPUT", "OUTPUT", "CACHE", "STAGES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # a child of --compare: one run with 1 worker
        cfg = curation.get_config()
        cfg.quality.cache_dir = args.one[2]  # an older revision's config has no such field; it is then unused
        stats = curation.run(args.one[0], args.one[1], cfg, stages=args.one[3], overwrite=True)
        with open(os.path.join(args.one[1], "stats.json"), encoding="utf-8") as f:
            print(json.dumps({"docs": stats["output"]["docs"], "tokens": stats["output"]["tokens"]}))
        return
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
    if args.compare:
        compare(args.compare, args.workdir, src, len(docs), mb)
        return
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


def _stage_rows(out: str) -> list:
    with open(os.path.join(out, "stats.json"), encoding="utf-8") as f:
        stats = json.load(f)
    return [(r["stage"], r["docs_in"], r["docs_out"], r["tokens_in"], r["tokens_out"],
             {k: v["docs"] for k, v in r["removed"].items()}) for r in stats["stages"]]


def compare(rev: str, workdir: str, src: str, n_docs: int, mb: float) -> None:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = os.path.join(workdir, "baseline")
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    archive = subprocess.run(["git", "-C", repo, "archive", rev, "llama_jax"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", base], input=archive.stdout, check=True)
    cache = os.path.join(workdir, "quality_cache")
    shutil.rmtree(cache, ignore_errors=True)
    no_near = ",".join(s for s in curation.STAGES if s != "near_dedup")
    runs = [(f"before ({rev})", base, "before", "all"), ("after, classifier fitted", repo, "after_cold", "all"),
            ("after, classifier cached", repo, "after_warm", "all"),
            (f"before ({rev}), no near_dedup", base, "before_no_near", no_near),
            ("after, cached, no near_dedup", repo, "after_no_near", no_near)]
    results = {}
    for label, path, name, stages in runs:
        out = os.path.join(workdir, name)
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", src, out, cache, stages],
                               env=dict(os.environ, PYTHONPATH=path), check=True, capture_output=True, text=True)
        wall = time.time() - start
        now = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (now.ru_utime - used.ru_utime) + (now.ru_stime - used.ru_stime)
        results[name] = (label, cpu, wall, json.loads(child.stdout.strip().splitlines()[-1]), out)
        print(f"{label:<33} {cpu:6.1f} CPU s  {n_docs / cpu:5.1f} docs per CPU s  {mb / cpu:.3f} MB per CPU s  "
              f"(wall {wall:.1f} s; load average {os.getloadavg()[0]:.1f})", flush=True)
    for first, name in (("before", "after_cold"), ("before", "after_warm"), ("before_no_near", "after_no_near")):
        before = results[first]
        label, cpu, _, out, path = results[name]
        shards = [sorted(glob.glob(os.path.join(p, "part-*.array_record"))) for p in (before[4], path)]
        same = [os.path.basename(p) for p in shards[0]] == [os.path.basename(p) for p in shards[1]] and all(
            open(x, "rb").read() == open(y, "rb").read() for x, y in zip(*shards))
        print(f"{label}: {before[1] / cpu:.2f}x the documents per CPU second; per-stage stats equal: "
              f"{_stage_rows(before[4]) == _stage_rows(path)}; shards byte-identical: {same}; out {out}")


if __name__ == "__main__":
    main()
