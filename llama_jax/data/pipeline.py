"""Grain input pipeline: read -> tokenize -> pack with segment ids -> mix -> batch, sharded per host.

Batch contract (:mod:`llama_jax.data.batch`, what the training step consumes): a dict of numpy int32 arrays,
each ``[B, L]`` with ``B`` the per-host batch (``global_batch_size // process_count``) and ``L = seq_len``::

    inputs, targets, segment_ids, positions, loss_mask     (+ host-only int64 ``documents`` when tracked)

Each document ``d = [BOS] + ids + [EOS]`` contributes ``inputs = d[:-1]`` and ``targets = d[1:]`` (so no
target is lost at packing boundaries). Documents are packed back to back into rows by grain's
``ConcatThenSplitIterDataset``: ``segment_ids`` number the documents of a row from 1 (0 = padding),
``positions`` restart at 0 for each document, ``loss_mask`` is 1 on real targets and 0 on padding. A document
that does not fit in the rest of a row is split there and continues in the next row(s) as a new segment whose
positions restart at 0 (each piece is attended to on its own); no token is dropped. Training streams repeat
forever; evaluation streams end after one pass, the last row and the last batch padded (``loss_mask`` 0).

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

* ``sources``: list of dicts, one per source:
    - ``name`` (str, unique; required),
    - ``kind``: ``"corpus"`` (the embedded stdlib corpus, :mod:`llama_jax.data.corpus`), ``"jsonl"`` (one JSON
      object per line), ``"text"`` (each file one document), ``"array_record"`` (one document per record),
    - ``path``: a file, a directory (all files below it, sorted) or a glob; for ``"corpus"`` the corpus source,
      ``"code"`` or ``"prose"`` (default ``"code"``); files named ``*.jsonl`` under a directory or glob of a
      ``"text"`` source are read as JSON lines,
    - ``split``: ``"train"`` (default) / ``"validation"`` select by the stable document hash of
      :func:`llama_jax.data.corpus.is_validation`; ``"all"`` takes every document (the only choice for
      ``"array_record"``, whose files are expected to be split already),
    - ``eval_split``: split read by the evaluation iterator (default ``"validation"``; ``"none"`` leaves the
      source out of evaluation, e.g. a synthetic source whose loss should not move a validation gate),
    - ``weight`` (float >= 0, default 1.0; zero leaves the source out of training),
    - ``text_key``: JSON key of the text (default ``"text"`` for jsonl; for array_record records are raw UTF-8
      text unless ``text_key`` is given, then each record is a JSON object),
    - ``packing``: ``"concat"`` (default: documents back to back, split at row ends, as above) or ``"whole"``
      (training rows hold whole documents only: grain's ``FirstFitPackIterDataset`` with one bin, in stream
      order, the rest of a row padded with ``loss_mask`` 0; a document longer than the row is an error naming
      the source, never truncated). For documents that are useless in pieces, such as synthetic retrieval
      tasks whose question must see its needle; the evaluation iterator always concatenates.
* ``cache_dir``: where the embedded corpus is built and cached (the run's workdir; required for ``"corpus"``
  sources unless passed to the iterator functions).
* ``shuffle`` (bool, default True): shuffle each source's documents (training only).
* ``num_workers`` (int, default 0): grain worker processes (``mp_prefetch``); 0 reads in the calling process.
* ``worker_buffer_size`` (int, default 2): batches buffered per worker.

The whole document list of jsonl and text sources is read into memory when the iterator is built; ArrayRecord
sources are read lazily by index. Text must be UTF-8 and a record's text a JSON string: a malformed record
(invalid JSON or UTF-8, a missing, null or non-string text) is an error; for jsonl and text sources all of them
are counted first and reported in one line naming the first few (``path:line: reason``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import zlib
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np

from llama_jax.data import batch as batch_lib
from llama_jax.data import corpus
from llama_jax.data import passkey
from llama_jax.data.batch import BATCH_KEYS, make_global_batch
from llama_jax.data.tokenizer import Tokenizer

KINDS = ("corpus", "jsonl", "text", "array_record", "passkey")
PACKINGS = ("concat", "whole")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One data source of the config (see the module docstring for the fields)."""

    name: str
    kind: str
    path: str | None = None
    split: str = "train"
    eval_split: str = "validation"
    weight: float = 1.0
    text_key: str | None = None
    options: Mapping[str, Any] | None = None  # settings of a synthetic kind (``passkey``)
    packing: str = "concat"

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], index: int) -> "SourceSpec":
        entry = dict(entry)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(f"data source {index}: unknown keys {sorted(unknown)}; expected {sorted(fields)}")
        if "name" not in entry or not entry["name"]:
            raise ValueError(f"data source {index}: missing 'name'")
        spec = cls(**entry)
        if spec.kind not in KINDS:
            raise ValueError(f"data source {spec.name!r}: unknown kind {spec.kind!r}; expected one of {KINDS}")
        for split in (spec.split,) + ((spec.eval_split,) if spec.eval_split != "none" else ()):
            if split not in ("train", "validation", "all"):
                raise ValueError(f"data source {spec.name!r}: unknown split {split!r}")
            if spec.kind == "array_record" and split != "all":
                raise ValueError(
                    f"data source {spec.name!r}: array_record sources are read whole; set split and eval_split "
                    f"to 'all' (got {split!r}) and give pre-split files as separate sources"
                )
        if spec.packing not in PACKINGS:
            raise ValueError(f"data source {spec.name!r}: unknown packing {spec.packing!r}; expected one of {PACKINGS}")
        if spec.kind == "passkey":
            passkey.check_options(spec.name, spec.options)
        elif spec.options:
            raise ValueError(f"data source {spec.name!r}: 'options' are only read by kind 'passkey'")
        if spec.kind not in ("corpus", "passkey") and not spec.path:
            raise ValueError(f"data source {spec.name!r}: kind {spec.kind!r} needs a 'path'")
        if spec.kind == "corpus" and spec.path not in (None, *corpus.SOURCES):
            raise ValueError(f"data source {spec.name!r}: corpus path must be one of {corpus.SOURCES}")
        w = spec.weight
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"data source {spec.name!r}: weight must be a finite number >= 0, got {w!r}")
        return spec


def _cfg_get(cfg: Any, key: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default) if hasattr(cfg, key) else default


def parse_sources(cfg: Any, key: str = "sources") -> list[SourceSpec]:
    """Validated :class:`SourceSpec` list from ``cfg[key]``."""
    entries = _cfg_get(cfg, key)
    if not entries:
        raise ValueError(f"data config has no {key!r}")
    specs = [SourceSpec.from_config(e, i) for i, e in enumerate(entries)]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate data source names: {duplicates}")
    return specs


# ---- reading ------------------------------------------------------------------------------------------------


def _expand_paths(spec: SourceSpec) -> list[str]:
    path = os.path.expanduser(spec.path)
    if os.path.isdir(path):
        files = sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names if not f.startswith(".")
        )
    elif os.path.exists(path):
        files = [path]
    else:
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"data source {spec.name!r}: path not found: {spec.path}")
    if not files:
        raise ValueError(f"data source {spec.name!r}: no files under {spec.path}")
    return files


def _file_kind(spec: SourceSpec, path: str) -> str:
    """How one file of a source is read: files named ``*.jsonl`` found under a directory or by a glob are read as
    JSON lines whatever the source's kind, so a folder of jsonl files is never trained on as raw JSON text."""
    if spec.kind == "text" and path.endswith(".jsonl") and os.path.abspath(path) != os.path.abspath(
            os.path.expanduser(spec.path)):
        return "jsonl"
    return spec.kind


def _utf8(raw: bytes, where: str, problems: list[str]) -> str | None:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(f"{where}: invalid UTF-8 at byte {e.start}")
        return None


def _record_text(obj: Any, key: str, where: str, problems: list[str]) -> str | None:
    """The text of one JSON record, or None (and a line in `problems`) when it has no string under `key`."""
    if not isinstance(obj, dict) or key not in obj:
        problems.append(f"{where}: no text key {key!r}")
    elif not isinstance(obj[key], str):
        problems.append(f"{where}: text {key!r} is {'null' if obj[key] is None else type(obj[key]).__name__}, "
                        "not a string")
    else:
        return obj[key]
    return None


def _read_jsonl(spec: SourceSpec, path: str, problems: list[str]) -> list[str]:
    key = spec.text_key or "text"
    texts = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _utf8(raw, f"{path}:{lineno}", problems)
            if line is None or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid JSON ({e})")
                continue
            text = _record_text(obj, key, f"{path}:{lineno}", problems)
            if text is not None:
                texts.append(text)
    return texts


def _read_text(path: str, problems: list[str]) -> list[str]:
    with open(path, "rb") as f:
        text = _utf8(f.read(), path, problems)
    return [] if text is None else [text]


def _read_files(spec: SourceSpec) -> list[str]:
    """Every document of a jsonl / text source, each file read by its kind. Malformed records (invalid JSON or
    UTF-8, a missing, null or non-string text) are all counted and reported in one error naming the first."""
    problems: list[str] = []
    texts = []
    for path in _expand_paths(spec):
        if _file_kind(spec, path) == "jsonl":
            texts += _read_jsonl(spec, path, problems)
        else:
            texts += _read_text(path, problems)
    if problems:
        shown = "; ".join(problems[:3])
        raise ValueError(f"data source {spec.name!r}: {len(problems)} malformed record"
                         f"{'s' if len(problems) > 1 else ''}: {shown}{'; ...' if len(problems) > 3 else ''}")
    return texts


def _split_filter(texts: list[str], split: str) -> list[str]:
    if split == "all":
        return texts
    want_validation = split == "validation"
    return [t for t in texts if corpus.is_validation(t) == want_validation]


class _DecodeRecord:
    """ArrayRecord bytes -> text (raw UTF-8, or a JSON object's ``text_key``); a malformed record (invalid UTF-8
    or JSON, no string text) raises naming the source and the record (records are read lazily, by index)."""

    def __init__(self, spec: SourceSpec):
        self.name, self.text_key = spec.name, spec.text_key

    def __call__(self, index: int, record: bytes) -> str:
        problems: list[str] = []
        where = f"record {index}"
        text = _utf8(record, where, problems)
        if text is not None and self.text_key:
            try:
                text = _record_text(json.loads(text), self.text_key, where, problems)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e})")
        if problems:
            raise ValueError(f"data source {self.name!r}: malformed {problems[0]}")
        return text


def source_documents(
    spec: SourceSpec, split: str, cache_dir: str | None, process_index: int, process_count: int
) -> grain.MapDataset:
    """A ``MapDataset`` of this process's documents (texts) of one source and split."""
    if spec.kind == "array_record":
        files = _expand_paths(spec)
        src = grain.sources.ArrayRecordDataSource(files)
        if len(src) == 0:
            raise ValueError(f"data source {spec.name!r}: no records in {spec.path}")
        ds = grain.MapDataset.source(src).map_with_index(_DecodeRecord(spec))
        n = len(src)
    else:
        if spec.kind == "passkey":
            texts = passkey.documents(spec.name, spec.options, split)
        elif spec.kind == "corpus":
            if not cache_dir:
                raise ValueError(f"data source {spec.name!r}: corpus sources need data.cache_dir (the workdir)")
            texts = corpus.load_documents(cache_dir, spec.path or "code", "train" if split == "all" else split)
            if split == "all":
                texts += corpus.load_documents(cache_dir, spec.path or "code", "validation")
        else:  # jsonl, text
            texts = _split_filter(_read_files(spec), split)
        if not texts:
            raise ValueError(f"data source {spec.name!r} ({spec.path or spec.kind}) has no documents in split {split!r}")
        ds = grain.MapDataset.source(texts)
        n = len(texts)
    if n < process_count:
        raise ValueError(
            f"data source {spec.name!r} has {n} documents in split {split!r}, fewer than {process_count} processes"
        )
    return ds[process_index::process_count]


# ---- tokenize and pack --------------------------------------------------------------------------------------


class TokenizeDocument:
    """text -> ``{"inputs": d[:-1], "targets": d[1:]}`` with ``d = [BOS] + ids + [EOS]`` (int32)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        d = np.asarray(self.tokenizer.encode(text, bos=True, eos=True, disallowed_special=()), dtype=np.int32)
        return {"inputs": d[:-1], "targets": d[1:]}


class TokenizeTrackedDocument(TokenizeDocument):
    """(index, text) -> :class:`TokenizeDocument`'s output plus ``documents``: the document's id in its source's
    stream (``start + index``, encoded by :func:`llama_jax.data.batch.encode_document_id`) on every token."""

    def __init__(self, tokenizer: Tokenizer, start: int, source_number: int, num_sources: int):
        super().__init__(tokenizer)
        self.start, self.source_number, self.num_sources = int(start), int(source_number), int(num_sources)

    def __call__(self, index: int, text: str) -> dict[str, np.ndarray]:
        out = super().__call__(text)
        doc_id = batch_lib.encode_document_id(self.start + index, self.source_number, self.num_sources)
        out[batch_lib.DOCUMENT_KEY] = np.full(out["inputs"].shape, doc_id, np.int64)
        return out


def to_batch_contract(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Grain's packed features -> the batch contract's names (one row)."""
    segment_ids = np.asarray(packed["inputs_segment_ids"], dtype=np.int32)
    extra = {}
    if batch_lib.DOCUMENT_KEY in packed:
        extra[batch_lib.DOCUMENT_KEY] = np.asarray(packed[batch_lib.DOCUMENT_KEY], np.int64)
    return extra | {
        "inputs": np.asarray(packed["inputs"], dtype=np.int32),
        "targets": np.asarray(packed["targets"], dtype=np.int32),
        "segment_ids": segment_ids,
        "positions": np.asarray(packed["inputs_positions"], dtype=np.int32),
        "loss_mask": (segment_ids > 0).astype(np.int32),
    }


class _SlicesAsTuples(grain.IterDataset):
    """Passes the packer's rows through; restores its state's slices as tuples after a JSON round trip.

    Grain's packer marks "no partly used document" with the slice ``(-1, -1)`` and compares with ``!=``; JSON
    turns the tuple into the list ``[-1, -1]``, which then reads as a remainder, so a state saved where a row
    ends at a document boundary (always the case at step 0) would resume one document late.
    """

    def __iter__(self) -> grain.DatasetIterator:
        return _SlicesAsTuplesIterator(self._parent.__iter__())


class _SlicesAsTuplesIterator(grain.DatasetIterator):
    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        slices = state.get("remainder_slices")
        if isinstance(slices, Mapping):
            state = {**state, "remainder_slices": {k: tuple(v) for k, v in slices.items()}}
        self._parent.set_state(state)


class _CheckFits:
    """Passes a tokenized document through, or raises if it cannot fit one row (``packing="whole"``)."""

    def __init__(self, seq_len: int, source: str):
        self.seq_len, self.source = int(seq_len), source

    def __call__(self, doc: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(doc["inputs"])
        if n > self.seq_len:
            raise ValueError(f"data source {self.source!r} packs whole documents (packing='whole'), but a document "
                             f"has {n} tokens (with BOS) and rows hold {self.seq_len}; shorten the source's "
                             "documents or use packing='concat'")
        return doc


def pack(ds: grain.IterDataset, seq_len: int, track_documents: bool = False, packing: str = "concat",
         source: str = "") -> grain.IterDataset:
    """Packs tokenized documents into rows of ``seq_len`` in the batch-contract format (``packing``: see the
    module docstring)."""
    lengths = {"inputs": seq_len, "targets": seq_len}
    if track_documents:
        lengths[batch_lib.DOCUMENT_KEY] = seq_len
    if packing == "whole":
        packed = grain.experimental.FirstFitPackIterDataset(ds.map(_CheckFits(seq_len, source)), length_struct=lengths,
                                                            num_packing_bins=1, shuffle_bins=False)
        return packed.map(to_batch_contract)
    if packing != "concat":
        raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
    packed = grain.experimental.ConcatThenSplitIterDataset(ds, length_struct=lengths)
    return _SlicesAsTuples(packed).map(to_batch_contract)


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
    return process_index, process_count, batch, cache_dir or _cfg_get(cfg, "cache_dir")


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
    shuffle = bool(_cfg_get(cfg, "shuffle", True))
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
        streams[spec.name] = pack(ds.to_iter_dataset(), seq_len, track_documents, spec.packing, spec.name)
        weights[spec.name] = float(spec.weight)
    mixed = grain.IterDataset.mix(streams, weights) if len(streams) > 1 else next(iter(streams.values()))
    out = mixed.batch(batch, drop_remainder=True)
    num_workers = int(_cfg_get(cfg, "num_workers", 0) or 0)
    if num_workers < 0:
        raise ValueError(f"data.num_workers={num_workers} must be >= 0")
    if num_workers > 0:
        _ensure_absl_flags_parsed()
        out = out.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=num_workers, per_worker_buffer_size=int(_cfg_get(cfg, "worker_buffer_size", 2))
            )
        )
    return out


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

    Returns:
      A ``grain.DatasetIterator`` (``get_state`` / ``set_state``; ``grain.checkpoint`` handler for Orbax).
    """
    ds = make_train_dataset(
        cfg, tokenizer, seq_len, global_batch_size, seed, process_index, process_count, cache_dir,
        start_documents, track_documents
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
