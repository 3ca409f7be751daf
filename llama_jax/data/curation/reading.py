"""Reading the curation input: the matched files and their jsonl records.

Records (one JSON object per input line): ``text`` or ``html`` (extracted by the ``extract`` stage), optional
``url``, ``id``, ``date`` (ISO 8601). Bad input (malformed JSON, a record without text, undecodable bytes, an
empty file) is counted per reason in ``stats.json`` and skipped.
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
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # Beam raises BeamIOError for a pattern that matches nothing
        raise FileNotFoundError(f"curate: no input files match {pattern!r}") from e
    files = sorted(m.path for m in metadata if not os.path.basename(m.path).startswith("."))
    if not files:
        raise FileNotFoundError(f"curate: no input files match {pattern!r}")
    return files


class ReadJsonl(beam.DoFn):
    """``(file index, path)`` -> records; bad lines go to the ``removed`` output as ``input/<reason>``."""

    def __init__(self, extract_enabled: bool, counter: TokenCounter, chars: int):
        self.extract_enabled = extract_enabled
        self.counter = counter
        self.chars = chars

    def _bad(self, reason: str, key: str, snippet: str):
        return beam.pvalue.TaggedOutput(REMOVED, ("removed", "input", reason, 1, 0, (key, snippet[: self.chars])))

    def process(self, element):
        index, path = element
        with FileSystems.open(path) as f:
            data = f.read()
        yield beam.pvalue.TaggedOutput(REMOVED, ("input", "files", 1))
        yield beam.pvalue.TaggedOutput(REMOVED, ("input", "bytes", len(data)))
        if not data.strip():
            yield self._bad("empty_file", f"{index:06d}", path)
            return
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            key = f"{index:06d}:{lineno:09d}"
            yield beam.pvalue.TaggedOutput(REMOVED, ("input", "lines", 1))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield self._bad("undecodable", key, f"{path}:{lineno}: {e}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield self._bad("malformed_json", key, f"{path}:{lineno}: {line}")
                continue
            if not isinstance(obj, dict):
                yield self._bad("malformed_json", key, f"{path}:{lineno}: not an object: {line}")
                continue
            text, html = obj.get("text"), obj.get("html")
            record: dict[str, Any] = {"key": key}
            if isinstance(text, str) and text.strip():
                record["text"] = text
            elif self.extract_enabled and isinstance(html, str) and html.strip():
                record["html"] = html
            else:
                yield self._bad("no_text", key, f"{path}:{lineno}: {line}")
                continue
            for field in PASSTHROUGH_FIELDS:
                if obj.get(field) is not None:
                    record[field] = obj[field] if isinstance(obj[field], (str, int, float)) else str(obj[field])
            record["ntok"] = self.counter(record["text"]) if "text" in record else 0
            yield record
