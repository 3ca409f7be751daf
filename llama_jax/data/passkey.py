"""Synthetic passkey-retrieval documents: the `passkey` data source kind (a small share of long-context data).

Llama 3 keeps long-context ability with a small share of synthetic long-context data (0.1% in post-training);
the `tiny` long-context experiment mixes these documents into its extension stages so that a small model learns
retrieval at all. One document is

    <training filler> "The pass key is K. Remember it. K is the pass key." <training filler>
    "What is the pass key? The pass key is K"

i.e. the needle and question of `llama_jax.infer.needle` (the same template, `needle_text` / `QUESTION`), with
two things kept apart from the evaluation so that the evaluation measures retrieval, not memorization:

* keys: 5-digit numbers are split in two by a hash (`is_eval_key`): the evaluation draws only evaluation keys,
  training documents only the others;
* filler: training documents are built from `TRAIN_FILLER_SENTENCES` (sentences of their own, in random order),
  never from the evaluation's `EVAL_FILLER`.

Source settings (the source's `options` mapping in the data config; all optional):
    documents   documents per split (default 2048); split "train" and "validation" are disjoint streams
                (seeded apart), "all" is both
    min_chars   shortest filler in characters (default 0)
    max_chars   longest filler in characters (default 4000); filler lengths are uniform in [min, max] and the
                needle's depth in the filler uniform in [0, 1]
    seed        generator seed (default 0)
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping

import numpy as np

EVAL_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = " What is the pass key? The pass key is"
TRAIN_FILLER_SENTENCES = (
    "A river runs past the old mill.", "Birds sing in the morning.", "The train left the station at noon.",
    "Snow covers the quiet hills.", "Bread is baked in the stone oven.", "The lamp flickers in the hall.",
    "Children play near the fountain.", "A cat sleeps on the warm roof.", "Clouds drift over the harbor.",
    "The market opens before dawn.", "Leaves fall in the autumn wind.", "A boat waits by the pier.",
    "The clock in the tower strikes.", "Rain taps on the window glass.", "The road bends toward the sea.",
    "Farmers gather the late harvest.",
)
OPTIONS = {"documents": 2048, "min_chars": 0, "max_chars": 4000, "seed": 0}
_SPLIT_SEED = {"train": 0, "validation": 1}


def is_eval_key(key: int) -> bool:
    """True for the half of the keys that the evaluation uses (training documents use the other half)."""
    return zlib.crc32(str(int(key)).encode()) % 2 == 0


def draw_key(rng: np.random.Generator, for_eval: bool) -> int:
    """A 5-digit key of the evaluation's half (`for_eval`) or of the training half."""
    while True:
        key = int(rng.integers(10_000, 100_000))
        if is_eval_key(key) == for_eval:
            return key


def needle_text(key: int) -> str:
    return f" The pass key is {key}. Remember it. {key} is the pass key. "


def check_options(name: str, options: Mapping[str, Any] | None) -> dict:
    """The source's settings with defaults; unknown keys and bad values are errors naming the source."""
    raw = dict(options or {})
    unknown = sorted(set(raw) - set(OPTIONS))
    if unknown:
        raise ValueError(f"data source {name!r}: unknown passkey option(s) {unknown}; known: {sorted(OPTIONS)}")
    out = {k: int(v) for k, v in {**OPTIONS, **raw}.items()}
    if out["documents"] < 1 or not 0 <= out["min_chars"] <= out["max_chars"]:
        raise ValueError(f"data source {name!r}: passkey options need documents >= 1 and 0 <= min_chars <= "
                         f"max_chars, got {out}")
    return out


def _filler(rng: np.random.Generator, chars: int) -> str:
    parts, size = [], 0
    while size < chars:
        s = TRAIN_FILLER_SENTENCES[int(rng.integers(len(TRAIN_FILLER_SENTENCES)))] + " "
        parts.append(s)
        size += len(s)
    return "".join(parts)[:chars]


def documents(name: str, options: Mapping[str, Any] | None, split: str) -> list[str]:
    """The source's documents of `split` ("train", "validation" or "all"), deterministic in the options."""
    o = check_options(name, options)
    if split == "all":
        return documents(name, options, "train") + documents(name, options, "validation")
    if split not in _SPLIT_SEED:
        raise ValueError(f"data source {name!r}: unknown split {split!r}")
    rng = np.random.default_rng([o["seed"], _SPLIT_SEED[split], 7919])
    out = []
    for _ in range(o["documents"]):
        key = draw_key(rng, for_eval=False)
        hay = _filler(rng, int(rng.integers(o["min_chars"], o["max_chars"] + 1)))
        cut = int(round(float(rng.random()) * len(hay)))
        out.append(hay[:cut] + needle_text(key) + hay[cut:] + QUESTION + f" {key}")
    return out
