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

The n-gram scores are computed on integer word ids with NumPy (n-grams built exactly, one word at a time, no
hashing); they equal the plain-Python definitions above value for value (``tests/data/curation/test_reference.py``).
"""

from __future__ import annotations

import collections
import functools
import math
import os
import re
from collections.abc import Mapping

import numpy as np

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
    hashtags = len(_HASHTAG_RE.findall(text)) if "#" in text else 0
    return hashtags + (len(_ELLIPSIS_RE.findall(text)) if "..." in text or "…" in text else 0)


class _Words:
    """A document's words as integer ids (first-occurrence order), their lengths, and its repeatable n-grams.

    :meth:`grams` builds n-gram ids exactly, one word at a time with ``np.unique`` (no hashing, so no
    collisions), and only where an n-gram can occur more than once: where its first ``n - 1`` words form an
    ``(n - 1)``-gram that occurs more than once (an n-gram that occurs twice has a prefix that does)."""

    def __init__(self, ws: list[str]):
        index: dict[str, int] = {}
        self.ws = ws
        self.ids = np.fromiter((index.setdefault(w, len(index)) for w in ws), dtype=np.int64, count=len(ws))
        self.index = index  # word -> id, in first-occurrence order
        self.counts = np.bincount(self.ids, minlength=len(index))  # per id
        self.lengths = np.fromiter(map(len, ws), dtype=np.int64, count=len(ws))
        self.total_chars = int(self.lengths.sum())
        self.char_prefix = np.concatenate([[0], np.cumsum(self.lengths)])
        self._grams = {1: (np.arange(len(ws)), self.ids, self.counts)}

    def grams(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(starts, ids, counts)``: n-grams starting at ``starts`` (among them every n-gram that occurs more
        than once, with all its occurrences), their ids (equal ids, equal n-grams) and each id's occurrences."""
        if n not in self._grams:
            prev_starts, prev_ids, prev_counts = self.grams(n - 1)
            keep = (prev_counts[prev_ids] > 1) & (prev_starts + n <= len(self.ws))
            starts = prev_starts[keep]
            pairs = prev_ids[keep] * max(len(self.index), 1) + self.ids[starts + n - 1]  # < len(ws)^2: fits int64
            uniq, ids = np.unique(pairs, return_inverse=True)
            ids = ids.reshape(-1)
            self._grams[n] = (starts, ids, np.bincount(ids, minlength=len(uniq)))
        return self._grams[n]

    def gram_chars(self, starts: np.ndarray, n: int) -> np.ndarray:
        """Word characters of the n-grams starting at ``starts``."""
        return self.char_prefix[starts + n] - self.char_prefix[starts]


def _top_ngram_fraction(doc: _Words, n: int) -> float:
    if len(doc.ws) < n or doc.total_chars == 0:
        return 0.0
    starts, ids, counts = doc.grams(n)
    count = int(counts.max()) if len(counts) else 0
    if count < 2:
        return 0.0
    chars = int(doc.gram_chars(starts[counts[ids] == count], n).max())  # ties: the longest
    return min(1.0, count * chars / doc.total_chars)


def _dup_ngram_fraction(doc: _Words, n: int) -> float:
    if len(doc.ws) < n or doc.total_chars == 0:
        return 0.0
    starts, ids, counts = doc.grams(n)
    repeated = starts[counts[ids] > 1]
    edges = np.zeros(len(doc.ws) + 1, dtype=np.int64)
    edges[repeated] += 1
    edges[repeated + n] -= 1
    covered = np.cumsum(edges[:-1]) > 0  # words inside at least one repeated n-gram
    return int(doc.lengths[covered].sum()) / doc.total_chars


def _kl_divergence(doc: _Words, corpus_counts: Mapping[str, int], corpus_total: int) -> float:
    if not doc.ws:
        return 0.0
    vocab = len(corpus_counts) + 1
    n = len(doc.ws)
    kl = 0.0
    for w, c in zip(doc.index, doc.counts.tolist()):
        p = c / n
        q = (corpus_counts.get(w, 0) + 1) / (corpus_total + vocab)
        kl += p * math.log(p / q)
    return kl


def kl_divergence(ws: list[str], corpus_counts: Mapping[str, int], corpus_total: int) -> float:
    """KL(document word distribution || smoothed corpus distribution) in nats."""
    return _kl_divergence(_Words(ws), corpus_counts, corpus_total)


def word_counts(text: str) -> dict[str, int]:
    """How often each word of :func:`words` occurs in ``text`` (the per-document part of the corpus vocabulary)."""
    return dict(collections.Counter(words(text)))


def _has_letter(word: str) -> bool:
    if word.isascii():  # the ASCII letters are exactly its cased characters
        return word.upper() != word.lower()
    return any(ch.isalpha() for ch in word)


def _alpha_words(raw_words: list[str]) -> int:
    """Whitespace-separated words containing a letter (each distinct word checked once)."""
    return sum(c for w, c in collections.Counter(raw_words).items() if _has_letter(w))


def scores(text: str, corpus_counts: Mapping[str, int] | None = None, corpus_total: int = 0) -> dict[str, float]:
    """All heuristic scores of ``text`` (``kl_divergence`` only when corpus counts are given)."""
    doc = _Words(words(text))
    ws, total_chars = doc.ws, doc.total_chars
    raw_words = text.split()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    dirty = dirty_words()
    out: dict[str, float] = {
        "words": float(len(ws)),
        "mean_word_length": total_chars / len(ws) if ws else 0.0,
        "symbol_word_ratio": symbol_count(text) / max(len(raw_words), 1),
        "alpha_word_fraction": _alpha_words(raw_words) / len(raw_words) if raw_words else 0.0,
        "bullet_line_fraction": sum(ln.startswith(_BULLETS) for ln in lines) / len(lines) if lines else 0.0,
        "ellipsis_line_fraction": (sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) if lines else 0.0),
        "dirty_word_ratio": (sum(int(doc.counts[i]) for w, i in doc.index.items() if w in dirty) / len(ws)
                             if ws else 0.0),
    }
    for n in TOP_NGRAMS:
        out[f"top_ngram_{n}"] = _top_ngram_fraction(doc, n)
    for n in DUP_NGRAMS:
        out[f"dup_ngram_{n}"] = _dup_ngram_fraction(doc, n)
    if corpus_counts is not None:
        out["kl_divergence"] = _kl_divergence(doc, corpus_counts, corpus_total)
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
