"""Tokenizing documents and packing them into rows of the batch contract (:mod:`llama_jax.data.batch`).

Each document ``d = [BOS] + ids + [EOS]`` contributes ``inputs = d[:-1]`` and ``targets = d[1:]``
(:class:`TokenizeDocument`; so no target is lost at packing boundaries). :func:`pack` turns a stream of
tokenized documents into rows of ``seq_len`` with ``segment_ids`` numbering the documents of a row from 1
(0 = padding), ``positions`` restarting at 0 for each document and ``loss_mask`` 1 on real targets, 0 on padding.
A source's ``packing`` chooses how:

* ``"concat"`` (default): documents back to back, by grain's ``ConcatThenSplitIterDataset``. A document that
  does not fit in the rest of a row is split there and continues in the next row(s) as a new segment whose
  positions restart at 0 (each piece is attended to on its own); no token is dropped.
* ``"whole"``: rows hold whole documents only (grain's ``FirstFitPackIterDataset`` with one bin, in stream
  order, the rest of a row padded with ``loss_mask`` 0); a document longer than the row is an error naming the
  source, never truncated. For documents that are useless in pieces, such as synthetic retrieval tasks whose
  question must see its needle. The evaluation iterator always concatenates.

With document tracking (:class:`TokenizeTrackedDocument`) each token also carries its document's id in its
source's stream (the host-only ``documents`` key), packed alongside the tokens. The packed stream's
``get_state()`` / ``set_state()`` survive a JSON round trip (:class:`_SlicesAsTuples`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from llama_jax.data import batch as batch_lib
from llama_jax.data.sources import PACKINGS
from llama_jax.data.tokenizer import Tokenizer


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
    module docstring; ``source`` names the source in errors)."""
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


__all__ = ["PACKINGS", "TokenizeDocument", "TokenizeTrackedDocument", "pack", "to_batch_contract"]
