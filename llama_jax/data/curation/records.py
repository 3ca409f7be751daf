"""What flows between the curation transforms: documents (dicts) and stat events (tuples).

A document is a dict with ``key`` (``FFFFFF:LLLLLLLLL``: file index in sorted match order, line number; every
deterministic choice breaks ties by it), ``text`` (or ``html`` until the ``extract`` stage), ``ntok`` (tokens of
``text``), the input's :data:`PASSTHROUGH_FIELDS` when present and the scores the stages add. Beam elements are
immutable: a stage that changes a document copies it.

A stage sends every document it removes to its ``removed`` output as the event
``("removed", stage, reason, 1, tokens, (key, example))`` (:func:`removed_event`); the event kinds and how they
are folded into ``stats.json``: :class:`llama_jax.data.curation.stats.StatsCombineFn`.
"""

from __future__ import annotations

import dataclasses
import functools

import apache_beam as beam

REMOVED = "removed"
"""The tag of every transform's second output: the stat events of what it removed."""
PASSTHROUGH_FIELDS = ("url", "id", "date")
"""Input fields copied into the document and written with it."""


class TokenCounter:
    """Counts tokens with a tokenizer file when given (exact), else Llama 3 pre-tokenizer pieces."""

    def __init__(self, tokenizer_path: str = ""):
        self.tokenizer_path = tokenizer_path

    @property
    def unit(self) -> str:
        return "tokens" if self.tokenizer_path else "pretokens"

    @functools.cached_property
    def _count(self):
        from llama_jax.data import tokenizer as tokenizer_lib  # noqa: PLC0415

        if self.tokenizer_path:
            tok = tokenizer_lib.Tokenizer.from_file(self.tokenizer_path)
            return lambda text: len(tok.encode(text, disallowed_special=()))
        return lambda text: len(tokenizer_lib.pretokenize(text))

    def __call__(self, text: str) -> int:
        return self._count(text)

    def __getstate__(self):
        return {"tokenizer_path": self.tokenizer_path}

    def __setstate__(self, state):
        self.tokenizer_path = state["tokenizer_path"]


@dataclasses.dataclass(frozen=True)
class StageContext:
    """What every stage transform may use besides its own config section."""

    counter: TokenCounter  # recounts ``ntok`` when a stage changes the text
    chars: int  # characters of a removed document quoted as its example in stats.json


def example(record: dict, chars: int) -> tuple[str, str]:
    """``(key, "[url=... id=...] " + the first ``chars`` characters)`` of a document."""
    text = record.get("text") or record.get("html") or ""
    label = " ".join(f"{k}={record[k]}" for k in ("url", "id") if record.get(k))
    return record["key"], (f"[{label}] " if label else "") + text[:chars]


def removed_event(stage: str, reason: str, record: dict, chars: int) -> beam.pvalue.TaggedOutput:
    """The ``removed`` output of a stage that drops ``record`` for ``reason``."""
    return beam.pvalue.TaggedOutput(REMOVED, ("removed", stage, reason, 1, record.get("ntok", 0),
                                              example(record, chars)))


def key_order(record: dict) -> str:
    return record["key"]
