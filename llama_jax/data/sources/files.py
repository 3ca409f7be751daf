"""The ``jsonl`` and ``text`` source kinds: documents read from files, the whole source into memory.

A source's ``path`` is a file, a directory (every file below it not starting with ``.``, in sorted order) or a
glob. A ``jsonl`` file holds one JSON object per line, its text under ``text_key`` (default ``"text"``); blank
lines are skipped. A ``text`` file is one document. Files named ``*.jsonl`` found under a directory or by a glob
of a ``text`` source are read as JSON lines, so a folder of jsonl files is never trained on as raw JSON text.
``split`` ``"train"`` / ``"validation"`` keep the documents on that side of
:func:`llama_jax.data.corpus.is_validation`; ``"all"`` keeps every one.

Malformed records (invalid UTF-8 or JSON, a missing, null or non-string text) are all counted and reported in
one error naming the first few (``path:line: reason``). :func:`expand_paths`, :func:`utf8` and
:func:`record_text` are shared with the ``array_record`` kind.
"""

from __future__ import annotations

import glob
import json
import os
from typing import TYPE_CHECKING, Any

from llama_jax.data import corpus

if TYPE_CHECKING:
    from llama_jax.data.sources import SourceSpec


def expand_paths(spec: SourceSpec) -> list[str]:
    """The files of a source's ``path`` (see the module docstring); none found is an error naming the source."""
    path = os.path.expanduser(spec.path)
    if os.path.isdir(path):
        found = sorted(
            os.path.join(d, f) for d, _, names in os.walk(path) for f in names if not f.startswith(".")
        )
    elif os.path.exists(path):
        found = [path]
    else:
        found = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not found:
            raise FileNotFoundError(f"data source {spec.name!r}: path not found: {spec.path}")
    if not found:
        raise ValueError(f"data source {spec.name!r}: no files under {spec.path}")
    return found


def _file_kind(spec: SourceSpec, path: str) -> str:
    """How one file of a source is read: files named ``*.jsonl`` found under a directory or by a glob are read as
    JSON lines whatever the source's kind, so a folder of jsonl files is never trained on as raw JSON text."""
    if spec.kind == "text" and path.endswith(".jsonl") and os.path.abspath(path) != os.path.abspath(
            os.path.expanduser(spec.path)):
        return "jsonl"
    return spec.kind


def utf8(raw: bytes, where: str, problems: list[str]) -> str | None:
    """``raw`` decoded as UTF-8, or None (and a line in ``problems``) when it is not valid UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.append(f"{where}: invalid UTF-8 at byte {e.start}")
        return None


def record_text(obj: Any, key: str, where: str, problems: list[str]) -> str | None:
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
            line = utf8(raw, f"{path}:{lineno}", problems)
            if line is None or not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{lineno}: invalid JSON ({e})")
                continue
            text = record_text(obj, key, f"{path}:{lineno}", problems)
            if text is not None:
                texts.append(text)
    return texts


def _read_text(path: str, problems: list[str]) -> list[str]:
    with open(path, "rb") as f:
        text = utf8(f.read(), path, problems)
    return [] if text is None else [text]


def _read_files(spec: SourceSpec) -> list[str]:
    """Every document of a jsonl / text source, each file read by its kind. Malformed records (invalid JSON or
    UTF-8, a missing, null or non-string text) are all counted and reported in one error naming the first."""
    problems: list[str] = []
    texts = []
    for path in expand_paths(spec):
        if _file_kind(spec, path) == "jsonl":
            texts += _read_jsonl(spec, path, problems)
        else:
            texts += _read_text(path, problems)
    if problems:
        shown = "; ".join(problems[:3])
        raise ValueError(f"data source {spec.name!r}: {len(problems)} malformed record"
                         f"{'s' if len(problems) > 1 else ''}: {shown}{'; ...' if len(problems) > 3 else ''}")
    return texts


def read(spec: SourceSpec, split: str, cache_dir: str | None) -> list[str]:  # pylint: disable=unused-argument
    """The documents of one split of a jsonl / text source, in file order (see the module docstring)."""
    texts = _read_files(spec)
    if split == "all":
        return texts
    want_validation = split == "validation"
    return [t for t in texts if corpus.is_validation(t) == want_validation]
