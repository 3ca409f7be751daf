"""The per-document curation stages as Beam transforms: extract, language, heuristics, quality, pii.

Every stage transform (here and in :mod:`llama_jax.data.curation.dedup_transforms`) has one shape, which the
pipeline's table (:data:`llama_jax.data.curation.pipeline.STAGE_TRANSFORMS`) relies on:

* it is built as ``Stage(cfg, ctx)`` from its config section (``cfg.<stage>`` of
  :mod:`llama_jax.data.curation.config`) and a :class:`~llama_jax.data.curation.records.StageContext`, in the
  launching process before any work, so bad settings fail early and fitted models ship inside the transform;
* applied to the PCollection of documents it returns ``(kept, removed)``: the documents it keeps (copied if
  changed) and the ``removed`` events of what it dropped, or ``None`` for a stage that drops nothing.

The per-document logic (scores, masks, extraction) lives in the filter-family modules (``extract``,
``language``, ``heuristics``, ``quality``, ``pii``); this module only wires it into Beam.
"""

from __future__ import annotations

from collections.abc import Sequence

import apache_beam as beam

from llama_jax.data.curation import extract, heuristics, language, pii, quality
from llama_jax.data.curation.records import REMOVED, StageContext, TokenCounter, removed_event


def _split(out):
    """``(kept, removed)`` of a ParDo with the ``removed`` side output."""
    return out.docs, out[REMOVED]


class _ExtractFn(beam.DoFn):
    def __init__(self, cfg, counter: TokenCounter, chars: int):
        self.cfg, self.counter, self.chars = cfg, counter, chars

    def process(self, record):
        if "html" not in record:
            yield record
            return
        record = dict(record)
        html = record.pop("html")
        text = extract.extract(html, self.cfg.include_tables, self.cfg.include_comments)
        if len(text.strip()) < max(self.cfg.min_chars, 1):
            record["text"] = html
            yield removed_event("extract", "no_main_text", record, self.chars)
            return
        record["text"] = text
        record["ntok"] = self.counter(text)
        yield record


class Extract(beam.PTransform):
    """``html`` records -> their main text (records with ``text`` pass); an empty extraction is removed.
    A missing extraction dependency fails here, in the launching process, before any work."""

    def __init__(self, cfg, ctx: StageContext):
        super().__init__()
        extract.check_available()
        self.fn = _ExtractFn(cfg, ctx.counter, ctx.chars)

    def expand(self, records):
        return _split(records | "Extract" >> beam.ParDo(self.fn).with_outputs(REMOVED, main="docs"))


class _LanguageFn(beam.DoFn):
    def __init__(self, cfg, chars: int):
        self.keep = frozenset(s.strip() for s in cfg.keep.split(",") if s.strip())
        self.threshold, self.max_chars, self.chars = cfg.threshold, cfg.max_chars, chars

    def process(self, record):
        lang, prob = language.identify(record["text"], self.max_chars)
        record = dict(record)
        record["language"], record["language_score"] = lang, round(prob, 4)
        if self.keep and lang not in self.keep:
            yield removed_event("language", "other_language", record, self.chars)
        elif prob < self.threshold:
            yield removed_event("language", "low_confidence", record, self.chars)
        else:
            yield record


class Language(beam.PTransform):
    """Keeps documents in a kept language detected with enough confidence; adds ``language(_score)``."""

    def __init__(self, cfg, ctx: StageContext):
        super().__init__()
        self.fn = _LanguageFn(cfg, ctx.chars)

    def expand(self, records):
        return _split(records | "Identify" >> beam.ParDo(self.fn).with_outputs(REMOVED, main="docs"))


class _HeuristicsFn(beam.DoFn):
    def __init__(self, cfg, chars: int):
        self.cfg, self.chars = cfg, chars

    def process(self, record, vocab):
        counts, total = vocab
        s = heuristics.scores(record["text"], counts, total)
        record = dict(record, heuristics={k: round(v, 4) for k, v in s.items()})
        reason = heuristics.verdict(s, self.cfg)
        if reason:
            yield removed_event("heuristics", reason, record, self.chars)
        else:
            yield record


def _corpus_vocab(records, cfg):
    """The corpus word distribution (top ``kl_vocab`` words and the total word count) as a singleton."""
    word_counts = (records  # one (word, count) element per distinct word of a document, summed per word
                   | "Words" >> beam.FlatMap(lambda r: heuristics.word_counts(r["text"]).items())
                   | "CountWords" >> beam.CombinePerKey(sum))
    top = word_counts | "Top" >> beam.combiners.Top.Of(cfg.kl_vocab, key=lambda wc: (wc[1], wc[0]))
    total = word_counts | "Values" >> beam.Values() | "Total" >> beam.CombineGlobally(sum)
    return top | "Vocab" >> beam.Map(lambda t, n: (dict(t), n), beam.pvalue.AsSingleton(total))


class Heuristics(beam.PTransform):
    """Gopher / RefinedWeb rules and the divergence from the corpus word distribution; adds ``heuristics``."""

    def __init__(self, cfg, ctx: StageContext):
        super().__init__()
        self.cfg, self.fn = cfg, _HeuristicsFn(cfg, ctx.chars)

    def expand(self, records):
        vocab = _corpus_vocab(records, self.cfg)
        return _split(records | "Judge" >> beam.ParDo(self.fn, beam.pvalue.AsSingleton(vocab))
                      .with_outputs(REMOVED, main="docs"))


class _QualityFn(beam.DoFn):
    def __init__(self, model, cfg, chars: int):
        self.model, self.cfg, self.chars = model, cfg, chars

    def process(self, batch: Sequence[dict]):
        for record, (p_good, domain) in zip(batch, self.model.score([r["text"] for r in batch])):
            record = dict(record, quality=round(p_good, 4), domain=domain)
            threshold = self.cfg.code_threshold if domain == "code" else self.cfg.threshold
            if p_good < threshold:
                yield removed_event("quality", f"low_quality_{domain}", record, self.chars)
            else:
                yield record


class Quality(beam.PTransform):
    """The model-based filter with code / prose routing; adds ``quality`` and ``domain``.

    The classifiers are fitted here, in the launching process (or loaded from ``cfg.cache_dir`` when a run with the
    same inputs fitted them before), and shipped to the workers inside the transform.
    """

    def __init__(self, cfg, ctx: StageContext):
        super().__init__()
        model = quality.QualityModel.cached(cfg.seed_documents, cfg.n_features, cfg.seed, cfg.get("cache_dir", ""))
        self.fn = _QualityFn(model, cfg, ctx.chars)

    def expand(self, records):
        return _split(records
                      | "Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=256)
                      | "Score" >> beam.ParDo(self.fn).with_outputs(REMOVED, main="docs"))


def _mask_pii(record: dict, cfg, counter: TokenCounter) -> dict:
    text, counts = pii.mask(record["text"], cfg.email, cfg.phone, cfg.ip)
    record = dict(record)
    if text != record["text"]:
        record["text"], record["ntok"] = text, counter(text)
    record["pii"] = counts
    return record


class Pii(beam.PTransform):
    """Masks e-mail addresses, phone numbers and IP addresses; adds ``pii`` (counts). Removes nothing."""

    def __init__(self, cfg, ctx: StageContext):
        super().__init__()
        self.cfg, self.counter = cfg, ctx.counter

    def expand(self, records):
        return records | "Mask" >> beam.Map(_mask_pii, self.cfg, self.counter), None
