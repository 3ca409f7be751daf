"""Document heuristics (Llama 3 §3.1.1; thresholds in the ``heuristics`` config, Gopher-style rules).

Scores of one document, all computed on its words (``\\w+`` runs, lower-cased) and lines:

* ``dup_ngram_<n>`` for n = 5..10: fraction of word characters covered by word n-grams that occur more than once
  (Gopher's duplicate n-gram character fraction; overlapping occurrences count once);
  ``top_ngram_<n>`` for n = 2..4: characters of the most frequent n-gram (the longest among ties) times its count over all word characters.
* ``dirty_word_ratio``: words of the shipped list (``dirty_words.txt``) per word.
* ``kl_divergence``: KL(p_doc || p_corpus) in nats, p_doc the document's word frequencies and p_corpus the corpus
  word frequencies (add-one smoothed over the corpus vocabulary plus an out-of-vocabulary bucket): high for a
  document made of tokens the corpus rarely uses (outlier tokens, foreign scripts, encoded blobs).
* ``words``, ``mean_word_length``, ``symbol_word_ratio`` (hashtags and ellipses per word, :func:`symbol_count`), ``alpha_word_fraction``
  (words containing a letter, over whitespace-separated words), ``bullet_line_fraction`` and
  ``ellipsis_line_fraction`` (of non-blank lines).
"""

from __future__ import annotations

import collections
import functools
import math
import os
import re
from collections.abc import Mapping

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_HASHTAG_RE = re.compile(r"(?<!\S)#\w", re.UNICODE)  # '#' opening a whitespace-separated word: #tag, not '# comment'
_ELLIPSIS_RE = re.compile(r"\.\.\.|…")
_BULLETS = ("•", "●", "○", "▪", "‣", "◦", "- ", "* ", "· ", "→")
TOP_NGRAMS = (2, 3, 4)
DUP_NGRAMS = (5, 6, 7, 8, 9, 10)


@functools.lru_cache(maxsize=1)
def dirty_words() -> frozenset[str]:
    """The shipped dirty-word list."""
    path = os.path.join(os.path.dirname(__file__), "dirty_words.txt")
    with open(path, encoding="utf-8") as f:
        return frozenset(w.strip() for w in f if w.strip() and not w.startswith("#"))


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def symbol_count(text: str) -> int:
    """Hashtags (``#`` opening a word, as in ``#tag``) plus ellipses (``...`` or ``…``) in ``text``.

    Gopher counts every ``#``; a ``#`` followed by a space or another ``#`` (code comments, banner lines,
    Markdown headings) is no hashtag, so code and Markdown are not penalized for it."""
    return len(_HASHTAG_RE.findall(text)) + len(_ELLIPSIS_RE.findall(text))


def _top_ngram_fraction(ws: list[str], n: int, total_chars: int) -> float:
    if len(ws) < n or total_chars == 0:
        return 0.0
    counts = collections.Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    count, chars = max((c, sum(len(w) for w in g)) for g, c in counts.items())  # ties: the longest
    if count < 2:
        return 0.0
    return min(1.0, count * chars / total_chars)


def _dup_ngram_fraction(ws: list[str], n: int, total_chars: int) -> float:
    if len(ws) < n or total_chars == 0:
        return 0.0
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    counts = collections.Counter(grams)
    covered = bytearray(len(ws))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(ws, covered) if c) / total_chars


def kl_divergence(ws: list[str], corpus_counts: Mapping[str, int], corpus_total: int) -> float:
    """KL(document word distribution || smoothed corpus distribution) in nats."""
    if not ws:
        return 0.0
    vocab = len(corpus_counts) + 1
    doc = collections.Counter(ws)
    n = len(ws)
    kl = 0.0
    for w, c in doc.items():
        p = c / n
        q = (corpus_counts.get(w, 0) + 1) / (corpus_total + vocab)
        kl += p * math.log(p / q)
    return kl


def scores(text: str, corpus_counts: Mapping[str, int] | None = None, corpus_total: int = 0) -> dict[str, float]:
    """All heuristic scores of ``text`` (``kl_divergence`` only when corpus counts are given)."""
    ws = words(text)
    total_chars = sum(len(w) for w in ws)
    raw_words = text.split()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out: dict[str, float] = {
        "words": float(len(ws)),
        "mean_word_length": total_chars / len(ws) if ws else 0.0,
        "symbol_word_ratio": symbol_count(text) / max(len(raw_words), 1),
        "alpha_word_fraction": (sum(any(ch.isalpha() for ch in w) for w in raw_words) / len(raw_words)
                                if raw_words else 0.0),
        "bullet_line_fraction": sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) if lines else 0.0,
        "ellipsis_line_fraction": (sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) if lines else 0.0),
        "dirty_word_ratio": (sum(w in dirty_words() for w in ws) / len(ws)) if ws else 0.0,
    }
    for n in TOP_NGRAMS:
        out[f"top_ngram_{n}"] = _top_ngram_fraction(ws, n, total_chars)
    for n in DUP_NGRAMS:
        out[f"dup_ngram_{n}"] = _dup_ngram_fraction(ws, n, total_chars)
    if corpus_counts is not None:
        out["kl_divergence"] = kl_divergence(ws, corpus_counts, corpus_total)
    return out


def verdict(s: Mapping[str, float], cfg) -> str | None:
    """The first rule of ``cfg`` (the ``heuristics`` config) that ``s`` breaks, or None if it passes."""
    if s["words"] < cfg.min_words:
        return "too_short"
    if s["words"] > cfg.max_words:
        return "too_long"
    if not cfg.min_mean_word_length <= s["mean_word_length"] <= cfg.max_mean_word_length:
        return "mean_word_length"
    if s["symbol_word_ratio"] > cfg.max_symbol_word_ratio:
        return "symbol_ratio"
    if s["alpha_word_fraction"] < cfg.min_alpha_word_fraction:
        return "alpha_word_fraction"
    if s["bullet_line_fraction"] > cfg.max_bullet_line_fraction:
        return "bullet_lines"
    if s["ellipsis_line_fraction"] > cfg.max_ellipsis_line_fraction:
        return "ellipsis_lines"
    if s["dirty_word_ratio"] > cfg.max_dirty_word_ratio:
        return "dirty_words"
    if s["words"] >= cfg.ngram_min_words:
        for n, limit in zip(TOP_NGRAMS, cfg.max_top_ngram_fraction):
            if s[f"top_ngram_{n}"] > limit:
                return f"top_ngram_{n}"
        for n, limit in zip(DUP_NGRAMS, cfg.max_dup_ngram_fraction):
            if s[f"dup_ngram_{n}"] > limit:
                return f"dup_ngram_{n}"
    if "kl_divergence" in s and s["words"] >= cfg.kl_min_words and s["kl_divergence"] > cfg.max_kl_divergence:
        return "kl_divergence"
    return None
