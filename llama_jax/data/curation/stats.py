"""Curation statistics: documents and tokens in / out per stage, removals per reason with examples, bad input;
written as ``stats.json`` and drawn as ``stats.png``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import apache_beam as beam

BAD_INPUT_REASONS = ("malformed_json", "no_text", "undecodable", "empty_file")
_BAD_INPUT_LABELS = {"malformed_json": "invalid JSON", "no_text": "without text", "undecodable": "not UTF-8"}


class StatsCombineFn(beam.CombineFn):
    """Folds the pipeline's stat events into one dict (order-independent, so the result is deterministic).

    Events: ``("count", point, docs, tokens)`` documents and tokens after a point (``"input"``, a stage name,
    ``"output"``); ``("removed", stage, reason, docs, tokens, example)`` with ``example = (key, text)``;
    ``("input", field, n)`` input-file totals; ``("shard", name, docs, bytes)``; ``("first_bad", key, text)`` a bad
    input record described in one line (the one with the smallest key is kept).
    """

    def __init__(self, examples_per_reason: int):
        self.examples_per_reason = examples_per_reason

    def create_accumulator(self):
        return {"count": {}, "removed": {}, "input": {}, "shards": {}, "first_bad": None}

    def _add(self, acc, event):
        kind = event[0]
        if kind == "count":
            _, point, docs, tokens = event
            d, t = acc["count"].get(point, (0, 0))
            acc["count"][point] = (d + docs, t + tokens)
        elif kind == "removed":
            _, stage, reason, docs, tokens, example = event
            key = f"{stage}/{reason}"
            d, t, examples = acc["removed"].get(key, (0, 0, []))
            examples = sorted([*examples, list(example)])[: self.examples_per_reason] if example else examples
            acc["removed"][key] = (d + docs, t + tokens, examples)
        elif kind == "input":
            _, field, n = event
            acc["input"][field] = acc["input"].get(field, 0) + n
        elif kind == "shard":
            _, name, docs, nbytes = event
            acc["shards"][name] = (docs, nbytes)
        elif kind == "first_bad":
            _, key, text = event
            if acc["first_bad"] is None or key < acc["first_bad"][0]:
                acc["first_bad"] = (key, text)
        return acc

    def add_input(self, acc, event):
        return self._add(acc, event)

    def merge_accumulators(self, accumulators):
        out = self.create_accumulator()
        for acc in accumulators:
            for point, (d, t) in acc["count"].items():
                self._add(out, ("count", point, d, t))
            for key, (d, t, examples) in acc["removed"].items():
                stage, reason = key.split("/", 1)
                self._add(out, ("removed", stage, reason, d, t, None))
                merged = out["removed"][key]
                out["removed"][key] = (merged[0], merged[1],
                                       sorted(merged[2] + examples)[: self.examples_per_reason])
            for field, n in acc["input"].items():
                self._add(out, ("input", field, n))
            out["shards"].update(acc["shards"])
            if acc["first_bad"] is not None:
                self._add(out, ("first_bad", *acc["first_bad"]))
        return out

    def extract_output(self, acc):
        return acc


def build(acc: Mapping[str, Any], stages: Sequence[str], token_unit: str, config: Mapping[str, Any]) -> dict:
    """The ``stats.json`` document from the combined events."""
    counts = acc["count"]
    removed = acc["removed"]
    bad = {reason: 0 for reason in BAD_INPUT_REASONS}
    bad_examples: dict[str, list] = {}
    for key, (docs, _, examples) in removed.items():
        stage, reason = key.split("/", 1)
        if stage == "input":
            bad[reason] = bad.get(reason, 0) + docs
            bad_examples[reason] = examples
    rows = []
    prev = counts.get("input", (0, 0))
    for stage in stages:
        out = counts.get(stage, (0, 0))
        reasons = {k.split("/", 1)[1]: {"docs": d, "tokens": t, "examples": [{"key": e[0], "text": e[1]}
                                                                             for e in ex]}
                   for k, (d, t, ex) in sorted(removed.items()) if k.split("/", 1)[0] == stage}
        rows.append({"stage": stage, "docs_in": prev[0], "docs_out": out[0], "tokens_in": prev[1],
                     "tokens_out": out[1], "removed": reasons})
        prev = out
    shards = [{"file": name, "docs": d, "bytes": b} for name, (d, b) in sorted(acc["shards"].items())]
    return {
        "token_unit": token_unit,
        "input": {**dict(sorted(acc["input"].items())), "docs": counts.get("input", (0, 0))[0],
                  "tokens": counts.get("input", (0, 0))[1]},
        "bad_input": bad,
        "bad_input_examples": {k: [{"key": e[0], "text": e[1]} for e in v] for k, v in sorted(bad_examples.items())},
        "bad_input_first": acc["first_bad"][1] if acc.get("first_bad") else None,
        "stages": rows,
        "output": {"docs": sum(s["docs"] for s in shards), "tokens": prev[1], "shards": shards},
        "config": dict(config),
    }


def _bad_input_counts(stats: Mapping[str, Any]) -> str:
    """``"3 malformed records (2 invalid JSON, 1 not UTF-8) and 1 empty file"``; ``""`` when the input was clean."""
    bad = stats["bad_input"]
    records = {reason: n for reason, n in bad.items() if n and reason != "empty_file"}
    parts = []
    if records:
        total = sum(records.values())
        kinds = ", ".join(f"{n} {_BAD_INPUT_LABELS.get(reason, reason)}" for reason, n in records.items())
        parts.append(f"{total} malformed record{'s' if total > 1 else ''} ({kinds})")
    if bad.get("empty_file"):
        parts.append(f"{bad['empty_file']} empty file{'s' if bad['empty_file'] > 1 else ''}")
    return " and ".join(parts)


def _input_and_first(stats: Mapping[str, Any]) -> tuple[str, str]:
    files = stats["input"].get("files", 0)
    name = f"input {stats['input'].get('pattern', '')!r}" + (f" ({files} files)" if files > 1 else "")
    first = stats.get("bad_input_first")
    return name, f"; first: {first}" if first else ""


def no_valid_record(stats: Mapping[str, Any]) -> str | None:
    """The error of a run whose input held no valid record (one line: the input, the counts, the first bad
    record), or None when at least one record was read."""
    if stats["input"]["docs"]:
        return None
    name, first = _input_and_first(stats)
    return f"curate: no valid record in {name}: {_bad_input_counts(stats) or 'no records'}{first}"


def bad_input_warning(stats: Mapping[str, Any]) -> str | None:
    """One line saying how many bad input records a successful run skipped and which was first, or None."""
    counts = _bad_input_counts(stats)
    if not counts:
        return None
    name, first = _input_and_first(stats)
    return f"curate: skipped {counts} in {name}{first}"


def write_json(stats: Mapping[str, Any], path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=1, ensure_ascii=False, sort_keys=False)
        f.write("\n")


def plot(stats: Mapping[str, Any], path: str) -> None:
    """``stats.png``: documents and tokens in / out per stage (bars) and examples of what each stage removed."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = stats["stages"]
    names = [r["stage"] for r in rows]
    fig = plt.figure(figsize=(13, 11))
    grid = fig.add_gridspec(3, 2, height_ratios=[1, 1, 1.3])
    for col, (unit, label) in enumerate((("docs", "documents"), ("tokens", f"tokens ({stats['token_unit']})"))):
        ax = fig.add_subplot(grid[0:2, col])
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r[f"{unit}_in"] for r in rows], width=0.4, label="in", color="#9ab")
        ax.bar([x + 0.2 for x in xs], [r[f"{unit}_out"] for r in rows], width=0.4, label="out", color="#357")
        ax.set_xticks(list(xs), names, rotation=45, ha="right")
        ax.set_title(f"{label} in / out per stage")
        ax.legend()
    ax = fig.add_subplot(grid[2, :])
    ax.axis("off")
    lines = []
    for r in rows:
        for reason, info in r["removed"].items():
            example = info["examples"][0]["text"] if info["examples"] else ""
            example = " ".join(example.split())[:110]
            lines.append(f"{r['stage']}/{reason}: {info['docs']} docs, e.g. \"{example}\"")
    for reason, n in stats["bad_input"].items():
        if n:
            lines.append(f"bad input/{reason}: {n}")
    ax.text(0, 1, "Removed (stage/reason: count, example)\n" + ("\n".join(lines[:24]) or "(nothing removed)"),
            va="top", ha="left", family="monospace", fontsize=8, wrap=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def removed_total(stats: Mapping[str, Any], stage: str) -> dict[str, int]:
    """``{reason: documents}`` removed by ``stage`` (a convenience for reports and tests)."""
    for r in stats["stages"]:
        if r["stage"] == stage:
            return {k: v["docs"] for k, v in r["removed"].items()}
    raise KeyError(f"stage {stage!r} did not run; ran {[r['stage'] for r in stats['stages']]}")


