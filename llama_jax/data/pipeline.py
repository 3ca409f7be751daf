"""Grain input pipeline: read -> tokenize -> pack with segment ids -> mix -> batch, sharded per host.

Batch contract (:mod:`llama_jax.data.batch`, what the training step consumes): a dict of numpy int32 arrays,
each ``[B, L]`` with ``B`` the per-host batch (``global_batch_size // process_count``) and ``L = seq_len``::

    inputs, targets, segment_ids, positions, loss_mask     (+ host-only int64 ``documents`` when tracked)

Sources are read by their kind (:mod:`llama_jax.data.sources`), each document tokenized as ``[BOS] + ids +
[EOS]`` and packed into rows (:mod:`llama_jax.data.packing`: ``segment_ids`` from 1, ``positions`` restarting
per document, ``loss_mask`` 0 on padding; documents split at row ends, or kept whole with ``packing="whole"``).
Training streams repeat forever; evaluation streams end after one pass, the last row and the last batch padded
(``loss_mask`` 0).

Mixing: each source is packed on its own, then rows are interleaved by grain's ``IterDataset.mix`` with integer
proportions from the weights, so a source's share of rows (and hence of tokens) follows its weight exactly over
each period of the deterministic interleaving. Sharding: process ``i`` of ``n`` reads documents ``i::n`` of
every source (disjoint shards covering all documents), shuffles its shard (reshuffled every epoch) and builds
its own rows. The returned training iterator is a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()``
(JSON-serializable) resume with exactly the next batch, and ``grain.checkpoint.CheckpointSave`` /
``CheckpointRestore`` store it in an Orbax checkpoint.

One stream at several shapes: a stage's batch-size / sequence-length ramp continues one document order. Each
source's stream is its shuffled, repeated document list; ``track_documents=True`` adds the host-only
``documents`` key (the stream index of each token's document, :func:`llama_jax.data.batch.consumed_documents`)
and ``start_documents={source: index}`` starts a source's stream at that index, so the driver re-packs the
remaining stream at the new shape (the rest of a document split across the boundary is dropped: each document
is used at most once per pass).

Data config keys (an ``ml_collections.ConfigDict`` or a plain mapping):

* ``sources``: list of dicts, one per source (keys: :mod:`llama_jax.data.sources`: ``name``, ``kind``,
  ``path``, ``split``, ``eval_split``, ``weight``, ``text_key``, ``options``, ``packing``).
* ``cache_dir``: where the embedded corpus is built and cached (the run's workdir; required for ``"corpus"``
  sources unless passed to the iterator functions).
* ``shuffle`` (bool, default True): shuffle each source's documents (training only).
* ``num_workers`` (int, default 0): grain worker processes (``mp_prefetch``); 0 reads in the calling process.
* ``worker_buffer_size`` (int, default 2): batches buffered per worker.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from llama_jax.data import sources
from llama_jax.data.batch import BATCH_KEYS, make_global_batch
from llama_jax.data.packing import TokenizeDocument, TokenizeTrackedDocument, pack, to_batch_contract
from llama_jax.data.sources import SourceSpec, config_value, parse_sources
from llama_jax.data.tokenizer import Tokenizer


def source_documents(
    spec: SourceSpec, split: str, cache_dir: str | None, process_index: int, process_count: int
) -> grain.MapDataset:
    """A ``MapDataset`` of this process's documents (texts) of one source and split (documents ``i::n``)."""
    docs = sources.lookup(spec.kind, spec.name).read(spec, split, cache_dir)
    if len(docs) == 0:
        raise ValueError(f"data source {spec.name!r} ({spec.path or spec.kind}) has no documents in split {split!r}")
    ds = docs if isinstance(docs, grain.MapDataset) else grain.MapDataset.source(docs)
    n = len(docs)
    if n < process_count:
        raise ValueError(
            f"data source {spec.name!r} has {n} documents in split {split!r}, fewer than {process_count} processes"
        )
    return ds[process_index::process_count]


def _source_seed(seed: int, name: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    if process_index is None or process_count is None:
        import jax  # pylint: disable=import-outside-toplevel

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of process_count={process_count}"
        )
    return global_batch_size // process_count


def _check_seq_len(seq_len: int) -> None:
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")


def _ensure_absl_flags_parsed() -> None:
    """Grain's worker processes read absl flags (their defaults) even outside an absl app; allow that."""
    from absl import flags  # pylint: disable=import-outside-toplevel

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _host_setup(cfg: Any, seq_len: int, global_batch_size: int, process_index: int | None,
                process_count: int | None, cache_dir: str | None) -> tuple[int, int, int, str | None]:
    """Validated (process_index, process_count, per-host batch, corpus cache dir) for an iterator."""
    _check_seq_len(seq_len)
    process_index, process_count = _process(process_index, process_count)
    batch = _local_batch_size(global_batch_size, process_count)
    return process_index, process_count, batch, cache_dir or config_value(cfg, "cache_dir")


def make_train_dataset(
    cfg: Any,
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    cache_dir: str | None = None,
    start_documents: Mapping[str, int] | None = None,
    track_documents: bool = False,
    readers_here: int = 1,
) -> grain.IterDataset:
    """The infinite training ``IterDataset`` of per-host batches (see :func:`make_train_iterator`)."""
    process_index, process_count, batch, cache_dir = _host_setup(
        cfg, seq_len, global_batch_size, process_index, process_count, cache_dir)
    all_specs = parse_sources(cfg)
    specs = [s for s in all_specs if s.weight > 0]
    if not specs:
        raise ValueError("all data source weights are zero; at least one must be positive")
    start_documents = dict(start_documents or {})
    unknown = sorted(set(start_documents) - {s.name for s in all_specs})
    if unknown:
        raise ValueError(f"start_documents names unknown data source(s) {unknown}")
    shuffle = bool(config_value(cfg, "shuffle", True))
    read_options = _read_options(readers_here)
    streams, weights = {}, {}
    for number, spec in enumerate(all_specs):
        if spec.weight <= 0:
            continue
        ds = source_documents(spec, spec.split, cache_dir, process_index, process_count)
        if shuffle:
            ds = ds.shuffle(seed=_source_seed(seed, spec.name))
        start = int(start_documents.get(spec.name, 0))
        if start < 0:
            raise ValueError(f"start_documents[{spec.name!r}]={start} must be >= 0")
        ds = ds.repeat()
        if start:
            ds = ds[start:]
        if track_documents:
            ds = ds.map_with_index(TokenizeTrackedDocument(tokenizer, start, number, len(all_specs)))
        else:
            ds = ds.map(TokenizeDocument(tokenizer))
        streams[spec.name] = pack(ds.to_iter_dataset(read_options), seq_len, track_documents, spec.packing, spec.name)
        weights[spec.name] = float(spec.weight)
    mixed = grain.IterDataset.mix(streams, weights) if len(streams) > 1 else next(iter(streams.values()))
    out = mixed.batch(batch, drop_remainder=True)
    num_workers = int(config_value(cfg, "num_workers", 0) or 0)
    if num_workers < 0:
        raise ValueError(f"data.num_workers={num_workers} must be >= 0")
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        out = out.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=int(config_value(cfg, "worker_buffer_size", 2))
            )
        )
    return out


_READ = grain.ReadOptions()  # grain's defaults: the read threads and prefetch buffer of one process's stream


def _read_options(readers_here: int) -> grain.ReadOptions:
    """Grain's read threads and prefetch buffer divided among the `readers_here` train iterators one process
    runs side by side (its logical data shards, `data.hosts`): one process's budget, however its data is cut.
    Without this, each shard iterator starts its own thread pool and prefetch buffer per source, and a process
    reading 16 shards spends 15x more time per step on thread hand-offs than one reading one."""
    n = max(int(readers_here), 1)
    return grain.ReadOptions(num_threads=max(_READ.num_threads // n, 1),
                             prefetch_buffer_size=max(_READ.prefetch_buffer_size // n, 1))


def make_train_iterator(
    cfg: Any,
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    cache_dir: str | None = None,
    start_documents: Mapping[str, int] | None = None,
    track_documents: bool = False,
    readers_here: int = 1,
) -> grain.DatasetIterator:
    """Infinite, checkpointable iterator of per-host training batches (the batch contract).

    Args:
      cfg: the data config (module docstring).
      tokenizer: encodes documents; BOS / EOS frame each one.
      seq_len: row length ``L``.
      global_batch_size: rows per step over all processes; each process yields ``global_batch_size //
        process_count`` rows.
      seed: shuffling seed (the same on all processes).
      process_index, process_count: this host's shard; default ``jax.process_index()`` / ``process_count()``.
      cache_dir: overrides ``cfg.cache_dir`` for corpus sources.
      start_documents: {source name: stream index} where each source's (shuffled, repeated) stream starts.
      track_documents: add the host-only ``documents`` key (see the module docstring).
      readers_here: train iterators this process runs side by side (its logical data shards); grain's read
        threads and prefetch buffer are divided among them.

    Returns:
      A ``grain.DatasetIterator`` (``get_state`` / ``set_state``; ``grain.checkpoint`` handler for Orbax).
    """
    ds = make_train_dataset(
        cfg, tokenizer, seq_len, global_batch_size, seed, process_index, process_count, cache_dir,
        start_documents, track_documents, readers_here
    )
    return iter(ds)


class EvalIterator(Iterator[dict[str, np.ndarray]]):
    """Finite, deterministic per-host evaluation batches, the last one padded to the full batch size.

    With ``num_batches`` set it yields exactly that many batches (all-padding batches after the data ends, or
    stopping early), so that all processes run the same number of evaluation steps.
    """

    def __init__(self, ds: grain.IterDataset, batch: int, seq_len: int, num_batches: int | None):
        self._it = iter(ds)
        self._batch, self._seq_len, self._num_batches = batch, seq_len, num_batches
        self._count = 0
        self._exhausted = False

    def _padding(self, rows: int) -> dict[str, np.ndarray]:
        return {k: np.zeros((rows, self._seq_len), np.int32) for k in BATCH_KEYS}

    def __next__(self) -> dict[str, np.ndarray]:
        if self._num_batches is not None and self._count >= self._num_batches:
            raise StopIteration
        if not self._exhausted:
            try:
                batch = next(self._it)
            except StopIteration:
                self._exhausted = True
        if self._exhausted:
            if self._num_batches is None:
                raise StopIteration
            batch = self._padding(self._batch)
        rows = batch["inputs"].shape[0]
        if rows < self._batch:
            pad = self._padding(self._batch - rows)
            batch = {k: np.concatenate([batch[k], pad[k]]) for k in BATCH_KEYS}
        self._count += 1
        return batch


def make_eval_iterator(
    cfg: Any,
    tokenizer: Tokenizer,
    seq_len: int,
    global_batch_size: int,
    process_index: int | None = None,
    process_count: int | None = None,
    cache_dir: str | None = None,
    num_batches: int | None = None,
    sources_key: str = "sources",
) -> EvalIterator:
    """One deterministic pass over every source's ``eval_split`` (weights ignored), packed and batched.

    Sources are read in config order without shuffling; ``num_batches`` fixes the number of batches (see
    :class:`EvalIterator`). ``sources_key`` picks another list of sources in ``cfg`` (e.g. ``"eval_sources"``).
    """
    process_index, process_count, batch, cache_dir = _host_setup(
        cfg, seq_len, global_batch_size, process_index, process_count, cache_dir)
    parts = [
        source_documents(spec, spec.eval_split, cache_dir, process_index, process_count)
        for spec in parse_sources(cfg, sources_key) if spec.eval_split != "none"
    ]
    if not parts:
        raise ValueError(f"data config: every source of {sources_key!r} has eval_split 'none'; nothing to evaluate")
    docs = grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]
    ds = pack(docs.map(TokenizeDocument(tokenizer)).to_iter_dataset(), seq_len).batch(batch)
    return EvalIterator(ds, batch, seq_len, num_batches)


def embedded_corpus_config(cache_dir: str, code_weight: float = 0.7, prose_weight: float = 0.3) -> dict[str, Any]:
    """A data config reading the embedded corpus: code and prose mixed by the given weights."""
    return {
        "cache_dir": cache_dir,
        "sources": [
            {"name": "stdlib_code", "kind": "corpus", "path": "code", "weight": code_weight},
            {"name": "stdlib_prose", "kind": "corpus", "path": "prose", "weight": prose_weight},
        ],
        "shuffle": True,
        "num_workers": 0,
    }


__all__ = [
    "BATCH_KEYS",
    "EvalIterator",
    "SourceSpec",
    "TokenizeDocument",
    "TokenizeTrackedDocument",
    "embedded_corpus_config",
    "make_eval_iterator",
    "make_global_batch",
    "make_train_dataset",
    "make_train_iterator",
    "pack",
    "parse_sources",
    "source_documents",
    "to_batch_contract",
]
