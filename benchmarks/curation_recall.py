"""Near-dedup recall on the embedded corpus: the share of document pairs with exact 5-gram Jaccard >= 0.8 that
MinHash LSH (the default ``near_dedup`` settings: 128 permutations, 16 bands x 8 rows, estimated Jaccard >= 0.8)
finds, for the shingle hashing of :func:`llama_jax.data.curation.dedup.shingle_hashes` and for BLAKE2b of each
shingle's text (the hashing it replaced), with the CPU seconds each spends on signatures.

    PYTHONPATH=. python benchmarks/curation_recall.py --seeds=1,2,3,4,5

The input is what near dedup sees: the embedded corpus after exact dedup (one document per whitespace-normalized
text). True pairs are found exactly (prefix filtering: two sets with Jaccard >= t share one of the first
``|s| - ceil(t |s|) + 1`` elements of each in a global rarest-first order; every candidate is then checked
exactly). A true pair is found when LSH makes it a candidate and its estimated Jaccard reaches the threshold
(pair recall), or when both documents end in one near-duplicate cluster, the connected components of the found
pairs, which is what the stage removes by (cluster recall). MinHash is random: recall is averaged over the
permutation seeds given.
"""

import argparse
import collections
import itertools
import math
import time

import numpy as np

from llama_jax.data import corpus
from llama_jax.data.curation import config, dedup


def true_pairs(sets: list[frozenset], t: float) -> set[tuple[int, int]]:
    freq = collections.Counter(s for st in sets for s in st)
    index = collections.defaultdict(list)
    for i, st in enumerate(sets):
        prefix = sorted(st, key=lambda s: (freq[s], s))[: len(st) - math.ceil(t * len(st)) + 1]
        for s in prefix:
            index[s].append(i)
    candidates = {(a, b) for ids in index.values() for a, b in itertools.combinations(ids, 2)}
    return {(a, b) for a, b in candidates
            if min(len(sets[a]), len(sets[b])) >= t * max(len(sets[a]), len(sets[b]))
            and dedup.jaccard(sets[a], sets[b]) >= t}


def blake2b_minhash(text, shingle_size, a, b):
    hashes = np.fromiter((dedup.stable_hash(s) for s in dedup.shingles(text, shingle_size)), dtype=np.uint64)
    sig = np.full(a.shape, np.iinfo(np.uint32).max, dtype=np.uint64)
    with np.errstate(over="ignore"):
        if len(hashes):
            sig = np.minimum(sig, ((hashes[:, None] * a[None, :] + b[None, :]) >> np.uint64(32)).min(axis=0))
    return sig.astype(np.uint32)


def found(sigs, cfg) -> set[tuple[int, int]]:
    buckets = collections.defaultdict(list)
    for i, sig in enumerate(sigs):
        for band in dedup.band_keys(sig, cfg.bands, cfg.rows):
            buckets[band].append(i)
    return {(a, b) for ids in buckets.values() for a, b in itertools.combinations(ids, 2)
            if dedup.estimated_jaccard(sigs[a], sigs[b]) >= cfg.threshold}


def _clusters(pairs, n):
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in pairs:
        parent[find(a)] = find(b)
    return [find(i) for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="1,2,3,4,5", help="MinHash permutation seeds (the default config's is 1)")
    args = ap.parse_args()
    cfg = config.get_config().near_dedup
    texts, seen = [], set()
    for _, _, text in corpus.iter_documents(corpus.stdlib_dir()):
        digest = dedup.content_hash(text)
        if digest not in seen:
            seen.add(digest)
            texts.append((text, frozenset(dedup.shingles(text, cfg.shingle_size))))
    truth = true_pairs([sh for _, sh in texts], cfg.threshold)
    print(f"{len(texts)} documents after exact dedup, {len(truth)} pairs with 5-gram Jaccard >= {cfg.threshold}")
    for name, fn in (("shingle_hashes (NumPy)", dedup.minhash), ("BLAKE2b per shingle", blake2b_minhash)):
        pair_hits, cluster_hits, below, cpu = 0, 0, 0, 0.0
        seeds = [int(x) for x in args.seeds.split(",")]
        for seed in seeds:
            a, b = dedup.permutations(cfg.num_perm, seed)
            start = time.process_time()
            sigs = [fn(text, cfg.shingle_size, a, b) for text, _ in texts]
            cpu += time.process_time() - start
            hits = found(sigs, cfg)
            root = _clusters(hits, len(texts))
            pair_hits += len(hits & truth)
            cluster_hits += sum(root[x] == root[y] for x, y in truth)
            below += len(hits - truth)
        total = len(truth) * len(seeds)
        print(f"{name:<24} pair recall {pair_hits / total:.1%}, cluster recall {cluster_hits / total:.1%} "
              f"(seeds {args.seeds}); found pairs below the threshold {below / len(seeds):.1f} per seed; "
              f"signatures {cpu / len(seeds):.1f} CPU s per seed", flush=True)


if __name__ == "__main__":
    main()
