"""Curation config: which stages run and each stage's thresholds (an ``ml_collections.ConfigDict``).

This file is also the default ``--config`` of ``python -m llama_jax.curate``; override single values with
``--config.near_dedup.threshold=0.7`` or pass another file with a ``get_config()``. Stage order is fixed
(:data:`STAGES`); ``stages`` selects a subset. Defaults follow the Llama 3 paper (§3.1.1) where it gives numbers
(line dedup: more than 6 repeats per bucket of 30M documents) and Gopher / RefinedWeb heuristics elsewhere.

Calibration (what was tuned, and on what): the embedded corpus (:mod:`llama_jax.data.corpus`, Python 3.11.7's
standard library: 1762 code and 1227 docstring/text documents, all taken as good data) was scored stage by stage
and these defaults were loosened until what each stage removed from it was junk-like or too short: language
threshold 0.5 -> 0.3 (py3langid scores code and short docstrings low; 0.5 dropped 14% of the corpus), the symbol
ratio counts hashtags instead of every ``#`` (code comments), duplicated / top n-gram limits raised to about the
corpus's 99th percentile of code and applied only from 50 words on, the divergence rule only from 200 words on
with limit 7.0 nats (KL falls with length; a 300-word random hex blob scores 9.5), line dedup ignores lines under
40 characters ('else:', 'import os' repeat in any code), and 'xxx' / 'cum' left the dirty-word list. With these
defaults a full run keeps 2623 of 2989 documents (93% of pre-tokens); benchmarks/README.md lists what each stage
removed. Crafted junk (keyword spam, hashtag lists, dirty words, navigation boilerplate, other
languages) is still removed (tests/data/curation). Not calibrated: the quality classifier's own 0.5 decision
thresholds (it removes 1.2% of the corpus) and the MinHash settings, which are the usual 0.8 / 16 x 8.
"""

from __future__ import annotations

from collections.abc import Sequence

import ml_collections

STAGES = ("extract", "language", "url_dedup", "exact_dedup", "near_dedup", "line_dedup", "heuristics",
          "quality", "pii")
"""Every stage, in the order the pipeline runs them."""


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    c = ml_collections.ConfigDict()
    c.stages = ",".join(STAGES)
    c.num_shards = 4  # output shards part-0000i-of-0000n.array_record
    c.tokenizer = ""  # a tokenizer.model (Meta format) for exact token counts; "" counts Llama 3 pre-tokens
    c.examples_per_reason = 3  # removed documents quoted per stage and reason in stats.json / stats.png
    c.example_chars = 160

    c.extract = ml_collections.ConfigDict(dict(
        include_tables=True,  # tables are kept as text
        include_comments=False,  # reader comments are boilerplate
        min_chars=1,  # an extraction shorter than this removes the document ("no_main_text")
    ))
    c.language = ml_collections.ConfigDict(dict(
        keep="en",  # comma-separated ISO 639-1 codes to keep; "" keeps every language
        threshold=0.3,  # minimum probability of the detected language (py3langid, normalized)
        max_chars=4000,  # characters of the document the detector reads
    ))
    c.url_dedup = ml_collections.ConfigDict(dict(
        strip_query=False,  # drop the whole query string (otherwise only tracking parameters are dropped)
    ))
    c.exact_dedup = ml_collections.ConfigDict(dict(
        normalize_whitespace=True,  # hash the text with runs of whitespace collapsed and ends stripped
    ))
    c.near_dedup = ml_collections.ConfigDict(dict(
        shingle_size=5,  # words per shingle
        num_perm=128,  # MinHash permutations (= bands * rows)
        bands=16,
        rows=8,
        threshold=0.8,  # estimated Jaccard similarity at or above which two candidates are duplicates
        seed=1,
    ))
    c.line_dedup = ml_collections.ConfigDict(dict(
        max_repeats=6,  # a line in more than this many documents of one bucket is removed everywhere
        bucket_docs=30_000_000,  # documents per bucket (the paper: 30M)
        min_line_chars=40,  # shorter (stripped) lines are never counted or removed: code lines
        # like 'else:', 'import os', 'with self.assertRaises(TypeError):' repeat in any code corpus
    ))
    c.heuristics = ml_collections.ConfigDict(dict(
        min_words=5,
        max_words=200_000,
        min_mean_word_length=2.0,
        max_mean_word_length=12.0,
        max_symbol_word_ratio=0.25,  # (hashtags '#word' + '...' + '…') per word; '# comment' is no hashtag
        min_alpha_word_fraction=0.35,  # words with at least one letter
        max_bullet_line_fraction=0.9,
        max_ellipsis_line_fraction=0.3,
        max_dirty_word_ratio=0.02,  # words of the shipped list (dirty_words.txt) per word
        ngram_min_words=50,  # shorter documents are not judged by the two n-gram rules below (too noisy)
        max_top_ngram_fraction=[0.3, 0.28, 0.26],  # characters in the most frequent 2-, 3-, 4-gram
        max_dup_ngram_fraction=[0.75, 0.7, 0.65, 0.6, 0.58, 0.56],  # characters in repeated 5..10-grams
        max_kl_divergence=7.0,  # KL(document || corpus) of word frequencies, in nats
        kl_min_words=200,  # shorter documents are not judged by divergence (KL falls with length; too noisy)
        kl_vocab=100_000,  # most frequent corpus words kept for the corpus distribution (the rest share a bucket)
    ))
    c.quality = ml_collections.ConfigDict(dict(
        threshold=0.5,  # minimum classifier probability of "good" to keep a document
        code_threshold=0.5,  # the same for documents routed to "code"
        seed_documents=400,  # positive seeds (half code, half prose) from the standard library; as many negatives
        n_features=2**18,  # hashed word 1-2-gram and character 3-5-gram features
        seed=0,
        cache_dir="~/.cache/llama_jax/curation",  # fitted classifiers kept by their inputs (a choice); "": refit
    ))
    c.pii = ml_collections.ConfigDict(dict(
        email="<EMAIL>",
        phone="<PHONE>",
        ip="<IP_ADDRESS>",
    ))
    return c


def parse_stages(stages: str | Sequence[str]) -> tuple[str, ...]:
    """Validated stage names in pipeline order (``"all"`` or ``""`` selects every stage)."""
    names = [s.strip() for s in (stages.split(",") if isinstance(stages, str) else stages) if s.strip()]
    if not names or names == ["all"]:
        return STAGES
    unknown = sorted(set(names) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown curation stage(s) {unknown}; expected a subset of {', '.join(STAGES)}")
    return tuple(s for s in STAGES if s in names)
