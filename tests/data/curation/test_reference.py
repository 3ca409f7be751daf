"""The fast curation functions against straightforward reference implementations, on a sample of the embedded
corpus (standard-library code and docstrings) and crafted edge cases: the heuristic scores, the per-document
word counts, PII masking and the MinHash signature must be identical (the references are plain Python, written
from the definitions in the modules' docstrings)."""

import collections
import math
import os
import re

import numpy as np
import pytest

from llama_jax.data import corpus
from llama_jax.data.curation import dedup, heuristics, pii

_WORD_RE = re.compile(r"\w+", re.UNICODE)


@pytest.fixture(scope="module")
def sample() -> list[str]:
    """About 60 code and docstring documents of the embedded corpus (every 25th file), plus edge cases."""
    root = corpus.stdlib_dir()
    docs = []
    for rel in [f for f in corpus.list_files(root) if f.endswith(".py")][::25]:
        text = corpus.read_text(os.path.join(root, rel))
        docs += [text, corpus.extract_docstrings(text)]
    repeated = " ".join(["buy the best cheap watches online today"] * 10)
    return docs + ["", "   \n ", "one", "a b a b a b", repeated, "x " * 12, "Ünïcödé wörds ² ½ 一 _ __ a_b …",
                   "#tag #two ok... and… # comment ## banner #!/bin/sh x#y\n- item\n• item..."]


# --- references: the plain-Python definitions --------------------------------------------------------------

def _ref_top_ngram_fraction(ws, n, total_chars):
    if len(ws) < n or total_chars == 0:
        return 0.0
    counts = collections.Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    count, chars = max((c, sum(len(w) for w in g)) for g, c in counts.items())
    if count < 2:
        return 0.0
    return min(1.0, count * chars / total_chars)


def _ref_dup_ngram_fraction(ws, n, total_chars):
    if len(ws) < n or total_chars == 0:
        return 0.0
    grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
    counts = collections.Counter(grams)
    covered = bytearray(len(ws))
    for i, gram in enumerate(grams):
        if counts[gram] > 1:
            covered[i:i + n] = b"\x01" * n
    return sum(len(w) for w, c in zip(ws, covered) if c) / total_chars


def _ref_kl(ws, corpus_counts, corpus_total):
    if not ws:
        return 0.0
    vocab = len(corpus_counts) + 1
    kl = 0.0
    for w, c in collections.Counter(ws).items():
        p = c / len(ws)
        q = (corpus_counts.get(w, 0) + 1) / (corpus_total + vocab)
        kl += p * math.log(p / q)
    return kl


def _ref_scores(text, corpus_counts, corpus_total):
    ws = _WORD_RE.findall(text.lower())
    total_chars = sum(len(w) for w in ws)
    raw_words = text.split()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out = {
        "words": float(len(ws)),
        "mean_word_length": total_chars / len(ws) if ws else 0.0,
        "symbol_word_ratio": (len(re.findall(r"(?<!\S)#\w", text)) + len(re.findall(r"\.\.\.|…", text)))
                             / max(len(raw_words), 1),
        "alpha_word_fraction": (sum(any(ch.isalpha() for ch in w) for w in raw_words) / len(raw_words)
                                if raw_words else 0.0),
        "bullet_line_fraction": (sum(ln.startswith(heuristics._BULLETS) for ln in lines) / len(lines)
                                 if lines else 0.0),
        "ellipsis_line_fraction": (sum(ln.endswith(("...", "…")) for ln in lines) / len(lines) if lines else 0.0),
        "dirty_word_ratio": (sum(w in heuristics.dirty_words() for w in ws) / len(ws)) if ws else 0.0,
    }
    for n in heuristics.TOP_NGRAMS:
        out[f"top_ngram_{n}"] = _ref_top_ngram_fraction(ws, n, total_chars)
    for n in heuristics.DUP_NGRAMS:
        out[f"dup_ngram_{n}"] = _ref_dup_ngram_fraction(ws, n, total_chars)
    out["kl_divergence"] = _ref_kl(ws, corpus_counts, corpus_total)
    return out


# --- the comparisons ---------------------------------------------------------------------------------------

def test_heuristic_scores_and_word_counts_equal_the_reference(sample):
    corpus_counts = collections.Counter(w for text in sample[::2] for w in heuristics.words(text))
    total = sum(corpus_counts.values())
    corpus_counts = dict(corpus_counts.most_common(2000))  # a vocabulary with out-of-vocabulary words
    for text in sample:
        assert heuristics.scores(text, corpus_counts, total) == _ref_scores(text, corpus_counts, total), text[:80]
    summed = sum((collections.Counter(heuristics.word_counts(text)) for text in sample), collections.Counter())
    assert summed == collections.Counter(w for text in sample for w in _WORD_RE.findall(text.lower()))


def _ref_mask(text):
    counts = {"email": 0, "phone": 0, "ip": 0}

    def sub(kind, replacement, check=lambda s: True):
        def repl(m):
            if not check(m.group(0)):
                return m.group(0)
            counts[kind] += 1
            return replacement
        return repl

    def is_ipv6(s):
        try:
            return sum(1 for g in s.split(":") if g) >= 3 and bool(pii.ipaddress.IPv6Address(s))
        except ValueError:
            return False

    text = pii.EMAIL_RE.sub(sub("email", "<EMAIL>"), text)
    text = pii.IPV4_RE.sub(sub("ip", "<IP_ADDRESS>"), text)
    text = pii.IPV6_RE.sub(sub("ip", "<IP_ADDRESS>", is_ipv6), text)
    text = pii.PHONE_RE.sub(sub("phone", "<PHONE>", lambda s: 9 <= sum(c.isdigit() for c in s) <= 15), text)
    return text, counts


def test_pii_mask_equals_every_pattern_applied(sample):
    planted = ["Mail a.b@example.org, call +1 415-555-0132 or (030) 1234 5678, from 10.0.0.1 or fe80::1:2:3.",
               "version 3.12.1 on 2024-01-31 at 12:30:45, x[::2], a::b, 1234567, 555.123.4567 and ::ffff:1.2.3.4"]
    for text in sample + planted:
        assert pii.mask(text) == _ref_mask(text), text[:80]
    assert pii.mask(planted[0])[1] == {"email": 1, "phone": 2, "ip": 2}


def test_shingle_hashes_are_the_shingle_set(sample):
    """One hash per distinct shingle and equal hashes for equal shingles: the exact Jaccard similarity of two
    documents' hash sets is that of their shingle sets."""
    docs = [t for t in sample if t.strip()][:40]
    for text in docs:
        assert len(dedup.shingle_hashes(text, 5)) == len(dedup.shingles(text, 5))
    edited = [d.replace("the", "a", 3) for d in docs]
    for x, y in zip(docs, edited):
        hx, hy = dedup.shingle_hashes(x, 5), dedup.shingle_hashes(y, 5)
        common = len(np.intersect1d(hx, hy))
        assert common / (len(hx) + len(hy) - common) == dedup.jaccard(dedup.shingles(x, 5), dedup.shingles(y, 5))
    assert len(dedup.shingle_hashes("", 5)) == 0 and len(dedup.shingle_hashes("two words", 5)) == 1


def _ref_components(pairs):
    parent = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for a, b in pairs:
        ra, rb = find(a), find(b)
        parent[max(ra, rb)] = min(ra, rb)
    return sorted((x, find(x)) for x in parent if find(x) != x)


def test_near_dedup_components_equal_a_union_find():
    """Chains longer than the propagation rounds (settled by the union-find of what still disagrees), a clique,
    a star around its largest key, random graphs."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from llama_jax.data.curation import dedup_transforms

    rng = np.random.default_rng(0)
    chain = [f"c{i:02d}" for i in range(13)]
    pairs = [(chain[i], chain[i + 1]) for i in range(12)]
    snake = [f"s{int(i):02d}" for i in rng.permutation(9)]
    pairs += [(min(x, y), max(x, y)) for x, y in zip(snake, snake[1:])]
    pairs += [(f"k{i}", f"k{j}") for i in range(4) for j in range(i + 1, 4)]
    pairs += [(f"t{i}", "t9") for i in range(5)] + [("p0", "p1")]
    random_nodes = [f"r{i:02d}" for i in range(40)]
    pairs += sorted({tuple(sorted(map(str, rng.choice(random_nodes, 2, replace=False)))) for _ in range(30)})
    assert len(chain) - 1 > dedup_transforms.LABEL_ROUNDS
    with beam.Pipeline() as p:
        marks = p | beam.Create(pairs) | dedup_transforms.Components()
        assert_that(marks, equal_to(_ref_components(pairs)))


def _ref_line_dedup(docs, max_repeats, bucket_docs, min_chars, counter):
    """The rule as the config states it, on the collapsed text of each line (no hashing of lines): a line of
    ``min_chars``+ stripped characters in more than ``max_repeats`` documents of a bucket is removed everywhere."""
    n_buckets = math.ceil(len(docs) / bucket_docs)
    bucket = {d["key"]: dedup.stable_hash(d["key"]) % n_buckets for d in docs}

    def counted(line):
        return len(line.strip()) >= min_chars

    seen = collections.Counter()
    for d in docs:
        seen.update({(bucket[d["key"]], " ".join(ln.split())) for ln in d["text"].splitlines() if counted(ln)})
    kept_docs, removed = [], []
    for d in docs:
        lines = d["text"].splitlines()
        kept = [ln for ln in lines if not (counted(ln) and seen[bucket[d["key"]], " ".join(ln.split())] > max_repeats)]
        if len(kept) == len(lines):
            kept_docs.append(dict(d, lines_removed=0))
        elif not "".join(kept).strip():
            removed.append(("all_lines_duplicated", d["key"]))
        else:
            text = "\n".join(kept)
            kept_docs.append(dict(d, text=text, lines_removed=len(lines) - len(kept), ntok=counter(text)))
    return kept_docs, removed


def test_line_dedup_equals_the_rule():
    """Three buckets (7, 13 and 20 documents); long lines drawn near the 6-document threshold, some repeated inside
    a document (counted once), some differing only in whitespace (one line), short lines (never counted) and
    documents made only of frequent lines (removed)."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from llama_jax.data import curation
    from llama_jax.data.curation import dedup_transforms
    from llama_jax.data.curation.records import StageContext, TokenCounter

    rng = np.random.default_rng(0)
    pool = [f"Boilerplate line number {i} that is long enough to be counted by line dedup." for i in range(12)]
    pool += [f"short line {i}" for i in range(3)]
    docs = []
    for i in range(40):
        lines = [ln for j, ln in enumerate(pool) if rng.random() < (0.05 * j if j < 12 else 0.15)]
        lines = [ln.replace(" that ", "  that\t") if rng.random() < 0.3 else ln for ln in lines]
        if i % 4:
            lines.append(f"Document {i} has a line of its own, long enough to be counted too.")
        if lines and rng.random() < 0.3:
            lines.append(lines[0])
        rng.shuffle(lines)
        docs.append({"key": f"000000:{i:09d}", "text": "\n".join(lines) + "\n", "ntok": len(lines)})
    cfg = curation.get_config().line_dedup
    cfg.bucket_docs = 15
    counter = TokenCounter()
    want_docs, want_removed = _ref_line_dedup(docs, cfg.max_repeats, cfg.bucket_docs, cfg.min_line_chars, counter)
    assert 0 < sum(d["lines_removed"] > 0 for d in want_docs) < len(want_docs) and want_removed  # all three cases
    with beam.Pipeline() as p:
        kept, removed = p | beam.Create(docs) | dedup_transforms.LineDedup(cfg, StageContext(counter, 20))
        assert_that(kept, equal_to(want_docs), label="Kept")
        assert_that(removed | beam.Map(lambda e: (e[2], e[5][0])), equal_to(want_removed), label="Removed")
