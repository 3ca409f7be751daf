"""The deduplication stages as Beam transforms: URL, exact, near (MinHash LSH) and line dedup.

Each has the stage shape of :mod:`llama_jax.data.curation.transforms` (``Stage(cfg, ctx)``, applied it returns
``(kept, removed)``). The keys and signatures come from :mod:`llama_jax.data.curation.dedup`; this module groups
by them and chooses the survivors, independently of how the work is split: duplicates keep the smallest
document key (URL dedup: the newest ``date``, then the smallest key), near-duplicate clusters are the connected
components of the verified LSH candidate pairs (:class:`Components`: the pairs are not sent to one key), and
line dedup sums per-line counts with a combiner and sends only the frequent lines to every worker.
"""

from __future__ import annotations

import datetime
import functools
import math
from collections.abc import Iterable

import apache_beam as beam

from llama_jax.data.curation import dedup
from llama_jax.data.curation.records import REMOVED, StageContext, TokenCounter, key_order, removed_event


def _date_rank(value) -> float:
    """Seconds since the epoch of an ISO 8601 date (naive = UTC); -inf when missing or unparseable."""
    if not isinstance(value, str) or not value.strip():
        return -math.inf
    try:
        d = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return -math.inf
    if d.tzinfo is None:
        d = d.replace(tzinfo=datetime.timezone.utc)
    return d.timestamp()


def _keep_first(group, order, stage: str, reason: str, chars: int):
    _, records = group
    ranked = sorted(records, key=order)
    yield ranked[0]
    for record in ranked[1:]:
        yield removed_event(stage, reason, record, chars)


def _url_order(record: dict):
    return (-_date_rank(record.get("date")), record["key"])


class _KeepFirst(beam.PTransform):
    """Keeps one record per key (``key_fn``), the first in ``order``; records with key None pass."""

    def __init__(self, stage, key_fn, order, reason, chars):
        super().__init__()
        self.stage, self.key_fn, self.order, self.reason, self.chars = stage, key_fn, order, reason, chars

    def expand(self, records):
        keyed = records | "Key" >> beam.Map(lambda r, f=self.key_fn: (f(r), r))
        parts = keyed | "HasKey" >> beam.Partition(lambda kv, n: 0 if kv[0] is None else 1, 2)
        kept = (parts[1] | "Group" >> beam.GroupByKey()
                | "Choose" >> beam.FlatMap(_keep_first, self.order, self.stage, self.reason, self.chars)
                .with_outputs(REMOVED, main="docs"))
        docs = (parts[0] | "NoKey" >> beam.Values(), kept.docs) | "Merge" >> beam.Flatten()
        return docs, kept[REMOVED]


def _url_key(record, strip_query):
    url = record.get("url")
    return dedup.normalize_url(str(url), strip_query) if url else None


class UrlDedup(_KeepFirst):
    """One document per normalized URL: the newest ``date``, then the smallest key."""

    def __init__(self, cfg, ctx: StageContext):
        super().__init__("url_dedup", functools.partial(_url_key, strip_query=cfg.strip_query), _url_order,
                         "older_url_duplicate", ctx.chars)


class ExactDedup(_KeepFirst):
    """One document per content hash (whitespace-normalized if configured): the smallest key."""

    def __init__(self, cfg, ctx: StageContext):
        super().__init__("exact_dedup", lambda r, w=cfg.normalize_whitespace: dedup.content_hash(r["text"], w),
                         key_order, "exact_duplicate", ctx.chars)


def _verified_pairs(group, threshold: float):
    """Candidate pairs of one LSH bucket whose estimated Jaccard reaches the threshold (smaller key first)."""
    _, members = group
    members = sorted({k: s for k, s in members}.items())
    for j in range(1, len(members)):
        for i in range(j):
            if dedup.estimated_jaccard(members[i][1], members[j][1]) >= threshold:
                yield members[i][0], members[j][0]


def _components(_, edges: Iterable[tuple[str, str]]):
    """Union-find over pairs: ``(member, smallest member)`` for every non-minimal member of each component."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    for x in sorted(parent):
        root = find(x)
        if root != x:
            yield x, root


LABEL_ROUNDS = 4
"""Rounds of smallest-label propagation over the duplicate pairs (a choice): a component whose smallest key is
within ``LABEL_ROUNDS - 1`` pairs of every member (LSH clusters are mostly cliques) is settled by them; what is left
is joined exactly by a union-find over the labels that still disagree."""


def _first_labels(edge: tuple[str, str]):
    a, b = edge
    yield from ((a, a), (a, b), (b, a), (b, b))


def _send_labels(joined):
    """A node's label to itself and to each neighbour."""
    node, groups = joined
    label = min(groups["label"])
    yield node, label
    for neighbor in groups["adjacent"]:
        yield neighbor, label


def _settle(group):
    """The smallest label a node received; the pairs of labels it saw that still disagree go to ``merge``."""
    node, labels = group
    labels = set(labels)
    low = min(labels)
    yield node, low
    for other in sorted(labels - {low}):
        yield beam.pvalue.TaggedOutput("merge", (low, other))


def _mark(node_label, roots):
    node, label = node_label
    root = roots.get(label, label)
    if root != node:
        yield node, root


class Components(beam.PTransform):
    """Connected components of a PCollection of ``(key, key)`` pairs, as ``(member, smallest member)`` for every
    member but the smallest, computed without sending the pairs to one key.

    Each node's label starts as the smallest key among itself and its neighbours (round 1); in each of the
    rounds 2 .. ``LABEL_ROUNDS`` it becomes the smallest label among its own and its neighbours' (a join with the
    pairs, then a min per node): every label is a member of the node's component, and after round ``r`` a node
    holds the smallest key within ``r`` pairs of it. The labels a node receives in the last round that still
    differ are merged by one union-find; only those pairs of labels (none, once every component is settled) go
    to a single key. The result is exact for any graph: the labels of a component are all joined, through the
    pairs, to its smallest key, which is its own label."""

    def expand(self, pairs):
        adjacency = pairs | "BothWays" >> beam.FlatMap(lambda e: ((e[0], e[1]), (e[1], e[0])))
        labels = pairs | "Label1" >> beam.FlatMap(_first_labels) | "Min1" >> beam.CombinePerKey(min)
        for r in range(2, LABEL_ROUNDS + 1):
            sent = ({"label": labels, "adjacent": adjacency} | f"Join{r}" >> beam.CoGroupByKey()
                    | f"Send{r}" >> beam.FlatMap(_send_labels))
            if r < LABEL_ROUNDS:
                labels = sent | f"Min{r}" >> beam.CombinePerKey(min)
        settled = (sent | "Received" >> beam.GroupByKey()
                   | "Settle" >> beam.FlatMap(_settle).with_outputs("merge", main="labels"))
        roots = (settled.merge | "DistinctMerges" >> beam.Distinct() | "One" >> beam.Map(lambda e: (0, e))
                 | "Unsettled" >> beam.GroupByKey() | "Roots" >> beam.FlatMapTuple(_components))
        return settled.labels | "Mark" >> beam.FlatMap(_mark, beam.pvalue.AsDict(roots))


def _drop_marked(joined, stage: str, reason: str, chars: int):
    _, groups = joined
    for record in groups["docs"]:
        marks = list(groups["marks"])
        if marks:
            record = dict(record, near_duplicate_of=marks[0])
            yield removed_event(stage, reason, record, chars)
        else:
            yield record


class NearDedup(beam.PTransform):
    """MinHash LSH near-duplicate removal: each cluster keeps its smallest key."""

    def __init__(self, cfg, ctx: StageContext):
        super().__init__()
        if cfg.bands * cfg.rows != cfg.num_perm:
            raise ValueError(f"near_dedup: bands * rows = {cfg.bands} * {cfg.rows} must equal num_perm = "
                             f"{cfg.num_perm}")
        if not 0.0 < cfg.threshold <= 1.0:
            raise ValueError(f"near_dedup: threshold must be in (0, 1], got {cfg.threshold}")
        if not 1 <= cfg.shingle_size <= dedup.MAX_SHINGLE_SIZE:
            raise ValueError(f"near_dedup: shingle_size must be in [1, {dedup.MAX_SHINGLE_SIZE}], got "
                             f"{cfg.shingle_size}")
        self.cfg, self.chars = cfg, ctx.chars

    def expand(self, records):
        cfg = self.cfg
        a, b = dedup.permutations(cfg.num_perm, cfg.seed)
        sigs = records | "MinHash" >> beam.Map(lambda r: (r["key"], dedup.minhash(r["text"], cfg.shingle_size, a, b)))
        pairs = (sigs
                 | "Bands" >> beam.FlatMap(lambda ks: [(band, ks) for band in dedup.band_keys(ks[1], cfg.bands,
                                                                                               cfg.rows)])
                 | "Buckets" >> beam.GroupByKey()
                 | "Verify" >> beam.FlatMap(_verified_pairs, cfg.threshold)
                 | "Distinct" >> beam.Distinct())
        marks = pairs | "Clusters" >> Components()
        keyed = records | "ByKey" >> beam.Map(lambda r: (r["key"], r))
        out = ({"docs": keyed, "marks": marks} | "Join" >> beam.CoGroupByKey()
               | "Drop" >> beam.FlatMap(_drop_marked, "near_dedup", "near_duplicate", self.chars)
               .with_outputs(REMOVED, main="docs"))
        return out.docs, out[REMOVED]


def _line_keys(record: dict, num_buckets: int, min_chars: int):
    """``(bucket, line key)`` once per distinct counted line of a document (lines of ``min_chars``+ characters)."""
    bucket = dedup.stable_hash(record["key"]) % max(num_buckets, 1)
    seen = set()
    for line in record["text"].splitlines():
        if len(line.strip()) < min_chars:
            continue
        lk = dedup.line_key(line)
        if lk and lk not in seen:
            seen.add(lk)
            yield (bucket, lk), 1


def _remove_lines(record: dict, frequent: frozenset, num_buckets: int, stage: str, min_chars: int,
                  counter: TokenCounter, chars: int):
    if not frequent:
        yield dict(record, lines_removed=0)
        return
    bucket = dedup.stable_hash(record["key"]) % max(num_buckets, 1)
    kept, removed = [], 0
    for line in record["text"].splitlines():
        if len(line.strip()) >= min_chars and (bucket, dedup.line_key(line)) in frequent:
            removed += 1
        else:
            kept.append(line)
    if not removed:
        yield dict(record, lines_removed=0)
        return
    if not "".join(kept).strip():
        yield removed_event(stage, "all_lines_duplicated", record, chars)
        return
    text = "\n".join(kept)
    yield dict(record, text=text, lines_removed=removed, ntok=counter(text))


class LineDedup(beam.PTransform):
    """Removes lines repeated in more than ``max_repeats`` documents of a bucket (Llama 3: 6 per 30M).

    A document falls in bucket ``stable_hash(key) % ceil(documents / bucket_docs)``; a line counts when it has
    ``min_line_chars`` or more characters once stripped, once per document, by the hash of its whitespace-collapsed
    text (:func:`dedup.line_key`). The ``(bucket, line)`` counts are summed with a combiner (each worker sends one
    partial count per distinct line, not one element per line and document), and the lines counted more than
    ``max_repeats`` times go to every worker as one side-input set; each document then drops its frequent lines in
    one pass, with no join of whole documents. That set is bounded: each of its lines stands for more than
    ``max_repeats`` documents of its bucket, so it holds at most ``(counted line, document) pairs / (max_repeats + 1)``
    keys, and in practice only the repeated boilerplate (menus, licence and copyright lines, codec headers: 746 of
    the 213,488 distinct counted lines of the whole embedded corpus). A key takes about 200 bytes in memory, so
    10M frequent lines hold about 2 GB on each worker."""

    def __init__(self, cfg, ctx: StageContext):
        super().__init__()
        self.cfg, self.counter, self.chars = cfg, ctx.counter, ctx.chars

    def expand(self, records):
        cfg = self.cfg
        num_buckets = (records | "Count" >> beam.combiners.Count.Globally()
                       | "Buckets" >> beam.Map(lambda n: max(1, math.ceil(n / cfg.bucket_docs))))
        frequent = (records
                    | "Lines" >> beam.FlatMap(_line_keys, beam.pvalue.AsSingleton(num_buckets), cfg.min_line_chars)
                    | "Documents" >> beam.CombinePerKey(sum)
                    | "Frequent" >> beam.FlatMap(lambda kv, m=cfg.max_repeats: [kv[0]] if kv[1] > m else [])
                    | "Set" >> beam.combiners.ToSet()
                    | "Frozen" >> beam.Map(frozenset))
        out = records | "Remove" >> beam.FlatMap(
            _remove_lines, beam.pvalue.AsSingleton(frequent), beam.pvalue.AsSingleton(num_buckets), "line_dedup",
            cfg.min_line_chars, self.counter, self.chars).with_outputs(REMOVED, main="docs")
        return out.docs, out[REMOVED]
