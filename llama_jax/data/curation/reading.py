"""Reading the curation input: the matched files and their jsonl records.

Records (one JSON object per input line): ``text`` or ``html`` (extracted by the ``extract`` stage), optional
``url``, ``id``, ``date`` (ISO 8601). Bad input (malformed JSON, a record without text, undecodable bytes, an
empty file) is counted per reason in ``stats.json`` (with the first bad record, ``bad_input_first``) and skipped;
an input without any valid record is an error (:func:`llama_jax.data.curation.stats.no_valid_record`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from llama_jax.data.curation.records import PASSTHROUGH_FIELDS, REMOVED, TokenCounter


def match_files(pattern: str) -> list[str]:
    """The files matching ``pattern`` (any Beam filesystem), sorted; an error if there are none."""
    if "://" not in pattern and not os.path.dirname(pattern):  # Beam's local glob matches nothing for "*.jsonl"
        pattern = os.path.join(".", pattern)
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # Beam raises BeamIOError for a pattern that matches nothing
        raise FileNotFoundError(f"curate: no input files match {pattern!r}") from e
    files = sorted(m.path for m in metadata if not os.path.basename(m.path).startswith("."))
    if not files:
        raise FileNotFoundError(f"curate: no input files match {pattern!r}")
    return files


def _quote(line: str, chars: int = 60) -> str:
    """The start of an input line, quoted on one line (control characters escaped)."""
    return repr(line[:chars]) + ("..." if len(line) > chars else "")


class ReadJsonl(beam.DoFn):
    """``(file index, path)`` -> records; bad lines go to the ``removed`` output as ``input/<reason>``."""

    def __init__(self, extract_enabled: bool, counter: TokenCounter, chars: int):
        self.extract_enabled = extract_enabled
        self.counter = counter
        self.chars = chars

    def _bad(self, reason: str, key: str, where: str, example: str, what: str):
        """The events of one bad record: counted with ``where: example`` as its example in ``stats.json``;
        ``where: what`` is the one line a run reports if this is the input's first bad record."""
        snippet = f"{where}: {example}" if example else where
        yield beam.pvalue.TaggedOutput(REMOVED, ("removed", "input", reason, 1, 0, (key, snippet[: self.chars])))
        yield beam.pvalue.TaggedOutput(REMOVED, ("first_bad", key, f"{where}: {what}"))

    def process(self, element):
        index, path = element
        with FileSystems.open(path) as f:
            data = f.read()
        yield beam.pvalue.TaggedOutput(REMOVED, ("input", "files", 1))
        yield beam.pvalue.TaggedOutput(REMOVED, ("input", "bytes", len(data)))
        if not data.strip():
            yield from self._bad("empty_file", f"{index:06d}", path, "", "empty file")
            return
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            key, where = f"{index:06d}:{lineno:09d}", f"{path}:{lineno}"
            yield beam.pvalue.TaggedOutput(REMOVED, ("input", "lines", 1))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield from self._bad("undecodable", key, where, str(e), f"not UTF-8 ({e})")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield from self._bad("malformed_json", key, where, line, f"invalid JSON: {_quote(line)}")
                continue
            if not isinstance(obj, dict):
                yield from self._bad("malformed_json", key, where, f"not an object: {line}",
                                     f"not a JSON object: {_quote(line)}")
                continue
            text, html = obj.get("text"), obj.get("html")
            record: dict[str, Any] = {"key": key}
            if isinstance(text, str) and text.strip():
                record["text"] = text
            elif self.extract_enabled and isinstance(html, str) and html.strip():
                record["html"] = html
            else:
                yield from self._bad("no_text", key, where, line, f"without text: {_quote(line)}")
                continue
            for field in PASSTHROUGH_FIELDS:
                if obj.get(field) is not None:
                    record[field] = obj[field] if isinstance(obj[field], (str, int, float)) else str(obj[field])
            record["ntok"] = self.counter(record["text"]) if "text" in record else 0
            yield record
