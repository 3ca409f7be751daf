"""The ``array_record`` source kind: one document per record of ArrayRecord files, read lazily by index.

Records are raw UTF-8 text, or JSON objects with the text under ``text_key`` when it is given (the format
``llama_jax.curate`` writes). The files are expected to be split already (``split`` and ``eval_split`` are
``"all"``; other splits are separate sources). A malformed record (invalid UTF-8 or JSON, no string text)
raises when it is read, naming the source and the record's index.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from llama_jax.data.sources import files

if TYPE_CHECKING:
    import grain

    from llama_jax.data.sources import SourceSpec


class _DecodeRecord:
    """ArrayRecord bytes -> text (raw UTF-8, or a JSON object's ``text_key``); a malformed record (invalid UTF-8
    or JSON, no string text) raises naming the source and the record (records are read lazily, by index)."""

    def __init__(self, spec: SourceSpec):
        self.name, self.text_key = spec.name, spec.text_key

    def __call__(self, index: int, record: bytes) -> str:
        problems: list[str] = []
        where = f"record {index}"
        text = files.utf8(record, where, problems)
        if text is not None and self.text_key:
            try:
                text = files.record_text(json.loads(text), self.text_key, where, problems)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: invalid JSON ({e})")
        if problems:
            raise ValueError(f"data source {self.name!r}: malformed {problems[0]}")
        return text


def read(spec: SourceSpec, split: str, cache_dir: str | None) -> grain.MapDataset:  # pylint: disable=unused-argument
    """Every record of the source's files (in path order) as a lazy ``MapDataset`` of texts; ``split`` is "all"."""
    # grain imports JAX: imported here so that the table of kinds stays importable by config checks.
    import grain  # pylint: disable=import-outside-toplevel,redefined-outer-name

    src = grain.sources.ArrayRecordDataSource(files.expand_paths(spec))
    if len(src) == 0:
        raise ValueError(f"data source {spec.name!r}: no records in {spec.path}")
    return grain.MapDataset.source(src).map_with_index(_DecodeRecord(spec))
