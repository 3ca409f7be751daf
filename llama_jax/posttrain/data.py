"""Post-training data in jsonl: dialogs and preference records, validated, counted and tokenized.

Dialog record (SFT data; also what rejection sampling writes)::

    {"messages": [{"role": "system"|"user"|"assistant"|"ipython", "content": str, "eom": bool?}, ...]}

A Llama 3.1 tool call is an assistant message whose content starts with `<|python_tag|>` and ends with
`<|eom_id|>` (`"eom": true`), followed by an `ipython` message with the tool's output. A dialog needs at least
one assistant message, and no assistant message may be empty.

Preference record (reward model and DPO data)::

    {"prompt": [messages...], "chosen": str, "rejected": str, "edited": str?, "strength": str?}

`chosen`, `rejected` and `edited` are the next assistant message's content; they must be non-empty and
distinct (a record whose chosen equals rejected carries no preference). `strength` is the annotator's label,
one of the paper's four levels (`STRENGTHS`, Llama 3 §4.2.1); the reward model and DPO keep only
"significantly better" and "better" (`KEPT_STRENGTHS`, as the paper does for both, §4.1.2; `keep_strengths`).
A record without a label (e.g. rejection sampling's best-vs-worst pairs) is not an annotation and is kept.
Prompt-only records (`{"prompt": [...], "answer": ...}`, rejection sampling's input) keep any extra keys for
the verifier.

Reading (`read_jsonl`) is lenient by default: a malformed record (bad JSON, a schema error) is skipped,
counted by reason in a `ReadReport` and logged with its line number; `strict=True` raises at the first one.
Tokenizing (`encode_sft`, `encode_preference`) follows a stated truncation policy for sequences longer than the
stage's sequence length: `"drop"` (default: the record is skipped and counted as `too_long`) or `"error"`.
Truncating a dialog would cut an assistant answer or its `<|eot_id|>`, teaching the model not to stop, so it
is not offered.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from absl import logging

from llama_jax.data.tokenizer import ROLES, Tokenizer

TRUNCATION = ("drop", "error")
RESPONSES = ("chosen", "rejected", "edited")
STRENGTHS = ("significantly better", "better", "slightly better", "marginally better")  # the paper's 4 levels
KEPT_STRENGTHS = STRENGTHS[:2]  # what the paper trains its reward model and DPO on


@dataclasses.dataclass
class ReadReport:
    """How many records a file held, how many were kept, and why the others were not."""

    path: str
    total: int = 0
    kept: int = 0
    malformed: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: list = dataclasses.field(default_factory=list)  # the first few "line N: reason"

    @property
    def skipped(self) -> int:
        return self.total - self.kept

    def add(self, line: int, reason: str) -> None:
        self.malformed[reason.split(":")[0]] += 1
        if len(self.examples) < 5:
            self.examples.append(f"line {line}: {reason}")

    def to_json(self) -> dict:
        return {"path": self.path, "total": self.total, "kept": self.kept, "malformed": dict(self.malformed),
                "examples": list(self.examples)}


def check_messages(messages: Any, what: str = "messages") -> list[dict]:
    """Validates a message list; returns it as plain dicts. Errors name the message and the problem."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{what}: must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"{what}[{i}]: a message must be an object with role and content")
        unknown = set(m) - {"role", "content", "eom"}
        if unknown:
            raise ValueError(f"{what}[{i}]: unknown keys {sorted(unknown)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{what}[{i}]: unknown role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{what}[{i}] ({role}): content must be a string")
        if role == "assistant" and not content.strip():
            raise ValueError(f"empty assistant turn: {what}[{i}] has no content")
        if m.get("eom") and role != "assistant":
            raise ValueError(f"{what}[{i}]: 'eom' is only valid on assistant messages, not {role!r}")
        out.append(dict(m))
    return out


def parse_dialog(record: Any) -> dict:
    """A validated dialog record ({"messages": [...]} with at least one non-empty assistant message)."""
    if not isinstance(record, Mapping) or "messages" not in record:
        raise ValueError("not a dialog: a record needs a 'messages' list")
    messages = check_messages(record["messages"])
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn: a dialog needs at least one assistant message to train on")
    return {**record, "messages": messages}


def parse_preference(record: Any) -> dict:
    """A validated preference record; chosen == rejected (or edited equal to either) is refused."""
    if not isinstance(record, Mapping):
        raise ValueError("not a preference record: expected an object")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"not a preference record: missing {missing}")
    prompt = check_messages(record["prompt"], "prompt")
    if prompt[-1]["role"] == "assistant":
        raise ValueError("prompt ends with an assistant message: the responses are the next assistant turn")
    out = {"prompt": prompt}
    for key in RESPONSES:
        if key not in record or (key == "edited" and record[key] is None):
            continue
        value = record[key]
        if not isinstance(value, str):
            raise ValueError(f"{key}: must be a string (the assistant response)")
        if not value.strip():
            raise ValueError(f"empty assistant turn: {key} is empty")
        out[key] = value
    if out["chosen"].strip() == out["rejected"].strip():
        raise ValueError("chosen equals rejected: the record expresses no preference")
    if "edited" in out and out["edited"].strip() in (out["chosen"].strip(), out["rejected"].strip()):
        raise ValueError("edited equals chosen or rejected: the ranking edited > chosen > rejected needs three "
                         "distinct responses")
    if record.get("strength") is not None:
        if record["strength"] not in STRENGTHS:
            raise ValueError(f"strength {record['strength']!r}: expected one of {STRENGTHS}")
        out["strength"] = record["strength"]
    return out


def keep_strengths(records: Sequence[Mapping], strengths: Sequence[str]) -> list[Mapping]:
    """The records whose `strength` is one of `strengths`, and every record without a label."""
    unknown = sorted(set(strengths) - set(STRENGTHS))
    if unknown:
        raise ValueError(f"strengths {unknown}: expected a subset of {STRENGTHS}")
    return [r for r in records if r.get("strength") is None or r["strength"] in strengths]


def parse_prompt(record: Any) -> dict:
    """A prompt record for rejection sampling: {"prompt": [messages], ...extra keys kept for the verifier}."""
    if not isinstance(record, Mapping) or "prompt" not in record:
        raise ValueError("not a prompt record: a record needs a 'prompt' list of messages")
    prompt = check_messages(record["prompt"], "prompt")
    if prompt[-1]["role"] == "assistant":
        raise ValueError("prompt ends with an assistant message: the sample is the next assistant turn")
    return {**record, "prompt": prompt}


PARSERS: dict[str, Callable[[Any], dict]] = {"dialog": parse_dialog, "preference": parse_preference,
                                             "prompt": parse_prompt}


def read_jsonl(path: str, kind: str, strict: bool = False) -> tuple[list[dict], ReadReport]:
    """(valid records, report) of a jsonl file of `kind` ("dialog", "preference" or "prompt")."""
    if kind not in PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; expected one of {sorted(PARSERS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{kind} data {path!r} does not exist")
    parse, records, report = PARSERS[kind], [], ReadReport(path)
    with open(path, "rb") as f:  # bytes: a bad byte is one malformed line, named, not a decode error for the file
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            report.total += 1
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"not UTF-8: byte {raw[e.start]:#04x} at column {e.start + 1}") from None
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"bad JSON: {e.msg}") from None
                except RecursionError:
                    raise ValueError("bad JSON: nested too deeply") from None
                records.append(parse(obj))
                report.kept += 1
            except ValueError as e:
                if strict:
                    raise ValueError(f"{path}:{line_no}: {e}") from None
                report.add(line_no, str(e))
    if report.skipped:
        logging.warning("%s: skipped %d of %d malformed %s records (%s); e.g. %s", path, report.skipped,
                        report.total, kind, dict(report.malformed), report.examples[:2])
    if not records:
        raise ValueError(f"{path}: no valid {kind} records ({report.total} read, malformed: "
                         f"{dict(report.malformed)})")
    return records, report


def write_jsonl(path: str, records: Sequence[Mapping]) -> None:
    """Writes records atomically (a temporary file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's file is private; the data is not
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# ------------------------------------------------------------------------------------------- tokenizing


def _too_long(what: str, n: int, seq_len: int, truncation: str) -> None:
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation={truncation!r}; expected one of {TRUNCATION}")
    if truncation == "error":
        raise ValueError(f"{what} has {n} tokens, longer than the sequence length {seq_len} + 1 (truncation "
                         "policy 'error'; use 'drop' to skip such records)")


def encode_sft(tokenizer: Tokenizer, messages: Sequence[Mapping], seq_len: int,
               truncation: str = "drop") -> dict[str, np.ndarray] | None:
    """A dialog as one training sequence: inputs / targets (shifted by one) / loss_mask, or None when it is
    longer than seq_len + 1 tokens and `truncation` is "drop".

    The loss mask is `encode_dialog`'s assistant mask: the assistant messages' content and the tokens that end
    them (`<|python_tag|>`, `<|eot_id|>` / `<|eom_id|>`, so the model learns to stop); system, user and
    ipython messages and every header are masked out.
    """
    tokens, mask = tokenizer.encode_dialog(messages)
    if len(tokens) > seq_len + 1:
        _too_long("dialog", len(tokens), seq_len, truncation)
        return None
    t = np.asarray(tokens, np.int32)
    return {"inputs": t[:-1], "targets": t[1:], "loss_mask": np.asarray(mask[1:], np.int32)}


def encode_response(tokenizer: Tokenizer, prompt: Sequence[Mapping], response: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, content mask) of prompt + one assistant response: the mask is True on the response's content
    only, so headers, `<|eot_id|>`, `<|eom_id|>` and `<|python_tag|>` are out (Llama 3's DPO masking)."""
    prefix, _ = tokenizer.encode_dialog(prompt, add_generation_prompt=True)
    tokens, masks = tokenizer.encode_dialog_masks(list(prompt) + [{"role": "assistant", "content": response}])
    if tokens[:len(prefix)] != prefix:
        raise ValueError("the prompt's encoding is not a prefix of the dialog's")
    content = np.asarray(masks.assistant_content, bool)
    content[:len(prefix)] = False
    return np.asarray(tokens, np.int32), content


def encode_preference(tokenizer: Tokenizer, record: Mapping, seq_len: int,
                      truncation: str = "drop") -> dict[str, dict[str, np.ndarray]] | None:
    """{response key: {"inputs", "targets", "loss_mask"}} for chosen / rejected (/ edited); None when a
    sequence is longer than seq_len + 1 and `truncation` is "drop"."""
    out = {}
    for key in RESPONSES:
        if key not in record:
            continue
        tokens, content = encode_response(tokenizer, record["prompt"], record[key])
        if len(tokens) > seq_len + 1:
            _too_long(f"preference {key} response", len(tokens), seq_len, truncation)
            return None
        out[key] = {"inputs": tokens[:-1], "targets": tokens[1:], "loss_mask": content[1:].astype(np.int32),
                    "tokens": tokens}
    return out


# ------------------------------------------------------------------------------------------ batch rows


def pack_rows(sequences: Sequence[Mapping[str, np.ndarray]], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Greedy in-order packing of sequences into rows of the batch contract (documents numbered from 1 in
    `segment_ids`, positions restarting at 0, padding with segment 0 and loss_mask 0)."""
    rows, current, used = [], [], 0
    for s in sequences:
        n = len(s["inputs"])
        if n > seq_len:
            raise ValueError(f"a sequence of {n} tokens does not fit the sequence length {seq_len}")
        if used + n > seq_len:
            rows.append(_row(current, seq_len))
            current, used = [], 0
        current.append(s)
        used += n
    if current:
        rows.append(_row(current, seq_len))
    return rows


def _row(sequences, seq_len: int) -> dict[str, np.ndarray]:
    row = {k: np.zeros(seq_len, np.int32) for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask")}
    at = 0
    for i, s in enumerate(sequences, 1):
        n = len(s["inputs"])
        for k in ("inputs", "targets", "loss_mask"):
            row[k][at:at + n] = s[k]
        row["segment_ids"][at:at + n] = i
        row["positions"][at:at + n] = np.arange(n)
        at += n
    return row


def single_row(sequence: Mapping[str, np.ndarray] | None, seq_len: int) -> dict[str, np.ndarray]:
    """One sequence alone in a row (None = an all-padding row)."""
    return _row([sequence] if sequence is not None else [], seq_len)


__all__ = ["KEPT_STRENGTHS", "RESPONSES", "ReadReport", "STRENGTHS", "TRUNCATION", "check_messages",
           "encode_preference", "encode_response", "encode_sft", "keep_strengths", "pack_rows", "parse_dialog",
           "parse_preference", "parse_prompt", "read_jsonl", "single_row", "write_jsonl"]
