"""The curation pipeline on Apache Beam: read jsonl -> extract -> language -> url / exact / near / line dedup ->
heuristics -> quality -> PII -> ArrayRecord shards + ``stats.json`` + ``stats.png``.

The same code runs on the DirectRunner (one machine, ``--direct_num_workers``) and on distributed runners
(``--runner=DataflowRunner|FlinkRunner|SparkRunner`` with their options); the output directory must then be on a
filesystem all workers share. Every choice is deterministic and independent of how the work is split: each
document has a key ``FFFFFF:LLLLLLLLL`` (file index in sorted match order, line number), duplicates keep the
smallest key (URL dedup: the newest ``date``, then the smallest key), near-duplicate clusters are the connected
components of the verified LSH candidate pairs, shards are assigned by a stable hash of the key and written in
key order. So 1 and N workers write byte-identical shards.

Records (one JSON object per input line): ``text`` or ``html`` (extracted by the ``extract`` stage), optional
``url``, ``id``, ``date`` (ISO 8601). Bad input (malformed JSON, a record without text, undecodable bytes, an
empty file) is counted per reason in ``stats.json`` and skipped. Output records: ``text``, the input's ``url`` /
``id`` / ``date`` when present, and the scores the stages computed (``language``, ``language_score``,
``heuristics``, ``quality``, ``domain``, ``lines_removed``, ``pii``).

Atomicity: everything is written to a sibling staging directory ``OUTPUT.tmp-<random>`` (each shard as a
hidden ``.inprogress`` file renamed when closed) and renamed to ``OUTPUT`` only after the pipeline succeeded and
the stats are written; a failed run removes its staging directory and leaves ``OUTPUT`` untouched.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from llama_jax.data.curation import config as config_lib
from llama_jax.data.curation import dedup, extract, heuristics, language, pii, stats

REMOVED = "removed"
EVENTS_FILE = "_events.json"
SHARD_PATTERN = "part-{:05d}-of-{:05d}.array_record"
PASSTHROUGH_FIELDS = ("url", "id", "date")


# ---- tokens ------------------------------------------------------------------------------------------------


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


def _example(record: dict, chars: int) -> tuple[str, str]:
    text = record.get("text") or record.get("html") or ""
    label = " ".join(f"{k}={record[k]}" for k in ("url", "id") if record.get(k))
    return record["key"], (f"[{label}] " if label else "") + text[:chars]


def _removed(stage: str, reason: str, record: dict, chars: int):
    return beam.pvalue.TaggedOutput(REMOVED, ("removed", stage, reason, 1, record.get("ntok", 0),
                                              _example(record, chars)))


# ---- reading -----------------------------------------------------------------------------------------------


class ReadJsonl(beam.DoFn):
    """``(file index, path)`` -> records; bad lines go to the ``removed`` output as ``input/<reason>``."""

    def __init__(self, extract_enabled: bool, counter: TokenCounter, chars: int):
        self.extract_enabled = extract_enabled
        self.counter = counter
        self.chars = chars

    def _bad(self, reason: str, key: str, snippet: str):
        return beam.pvalue.TaggedOutput(REMOVED, ("removed", "input", reason, 1, 0, (key, snippet[: self.chars])))

    def process(self, element):
        index, path = element
        with FileSystems.open(path) as f:
            data = f.read()
        yield beam.pvalue.TaggedOutput(REMOVED, ("input", "files", 1))
        yield beam.pvalue.TaggedOutput(REMOVED, ("input", "bytes", len(data)))
        if not data.strip():
            yield self._bad("empty_file", f"{index:06d}", path)
            return
        for lineno, raw in enumerate(data.split(b"\n"), 1):
            if not raw.strip():
                continue
            key = f"{index:06d}:{lineno:09d}"
            yield beam.pvalue.TaggedOutput(REMOVED, ("input", "lines", 1))
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield self._bad("undecodable", key, f"{path}:{lineno}: {e}")
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield self._bad("malformed_json", key, f"{path}:{lineno}: {line}")
                continue
            if not isinstance(obj, dict):
                yield self._bad("malformed_json", key, f"{path}:{lineno}: not an object: {line}")
                continue
            text, html = obj.get("text"), obj.get("html")
            record: dict[str, Any] = {"key": key}
            if isinstance(text, str) and text.strip():
                record["text"] = text
            elif self.extract_enabled and isinstance(html, str) and html.strip():
                record["html"] = html
            else:
                yield self._bad("no_text", key, f"{path}:{lineno}: {line}")
                continue
            for field in PASSTHROUGH_FIELDS:
                if obj.get(field) is not None:
                    record[field] = obj[field] if isinstance(obj[field], (str, int, float)) else str(obj[field])
            record["ntok"] = self.counter(record["text"]) if "text" in record else 0
            yield record


# ---- per-document stages -----------------------------------------------------------------------------------


class Extract(beam.DoFn):
    def __init__(self, cfg, counter: TokenCounter, chars: int):
        self.cfg, self.counter, self.chars = cfg, counter, chars

    def process(self, record):
        if "html" not in record:
            yield record
            return
        record = dict(record)  # Beam elements are immutable: every stage that changes a record copies it
        html = record.pop("html")
        text = extract.extract(html, self.cfg.include_tables, self.cfg.include_comments)
        if len(text.strip()) < max(self.cfg.min_chars, 1):
            record["text"] = html
            yield _removed("extract", "no_main_text", record, self.chars)
            return
        record["text"] = text
        record["ntok"] = self.counter(text)
        yield record


class Language(beam.DoFn):
    def __init__(self, cfg, chars: int):
        self.keep = frozenset(s.strip() for s in cfg.keep.split(",") if s.strip())
        self.threshold, self.max_chars, self.chars = cfg.threshold, cfg.max_chars, chars

    def process(self, record):
        lang, prob = language.identify(record["text"], self.max_chars)
        record = dict(record)
        record["language"], record["language_score"] = lang, round(prob, 4)
        if self.keep and lang not in self.keep:
            yield _removed("language", "other_language", record, self.chars)
        elif prob < self.threshold:
            yield _removed("language", "low_confidence", record, self.chars)
        else:
            yield record


class Heuristics(beam.DoFn):
    def __init__(self, cfg, chars: int):
        self.cfg, self.chars = cfg, chars

    def process(self, record, vocab):
        counts, total = vocab
        s = heuristics.scores(record["text"], counts, total)
        record = dict(record, heuristics={k: round(v, 4) for k, v in s.items()})
        reason = heuristics.verdict(s, self.cfg)
        if reason:
            yield _removed("heuristics", reason, record, self.chars)
        else:
            yield record


class Quality(beam.DoFn):
    def __init__(self, model, cfg, chars: int):
        self.model, self.cfg, self.chars = model, cfg, chars

    def process(self, batch: Sequence[dict]):
        for record, (p_good, domain) in zip(batch, self.model.score([r["text"] for r in batch])):
            record = dict(record, quality=round(p_good, 4), domain=domain)
            threshold = self.cfg.code_threshold if domain == "code" else self.cfg.threshold
            if p_good < threshold:
                yield _removed("quality", f"low_quality_{domain}", record, self.chars)
            else:
                yield record


def _mask_pii(record: dict, cfg, counter: TokenCounter) -> dict:
    text, counts = pii.mask(record["text"], cfg.email, cfg.phone, cfg.ip)
    record = dict(record)
    if text != record["text"]:
        record["text"], record["ntok"] = text, counter(text)
    record["pii"] = counts
    return record


# ---- dedup stages ------------------------------------------------------------------------------------------


def _date_rank(value) -> float:
    """Seconds since the epoch of an ISO 8601 date (naive = UTC); -inf when missing or unparseable."""
    if not isinstance(value, str) or not value.strip():
        return -math.inf
    try:
        d = datetime.datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        return -math.inf
    if d.tzinfo is None:
        d = d.replace(tzinfo=datetime.timezone.utc)
    return d.timestamp()


def _keep_first(group, order, stage: str, reason: str, chars: int):
    _, records = group
    ranked = sorted(records, key=order)
    yield ranked[0]
    for record in ranked[1:]:
        yield _removed(stage, reason, record, chars)


def _url_order(record: dict):
    return (-_date_rank(record.get("date")), record["key"])


def _key_order(record: dict):
    return record["key"]


class _Dedup(beam.PTransform):
    """Keeps one record per key (``key_fn``), the first in ``order``; records with key None pass."""

    def __init__(self, stage, key_fn, order, reason, chars):
        super().__init__()
        self.stage, self.key_fn, self.order, self.reason, self.chars = stage, key_fn, order, reason, chars

    def expand(self, records):
        keyed = records | "Key" >> beam.Map(lambda r, f=self.key_fn: (f(r), r))
        parts = keyed | "HasKey" >> beam.Partition(lambda kv, n: 0 if kv[0] is None else 1, 2)
        kept = (parts[1] | "Group" >> beam.GroupByKey()
                | "Choose" >> beam.FlatMap(_keep_first, self.order, self.stage, self.reason, self.chars)
                .with_outputs(REMOVED, main="docs"))
        docs = (parts[0] | "NoKey" >> beam.Values(), kept.docs) | "Merge" >> beam.Flatten()
        return docs, kept[REMOVED]


def _url_key(record, strip_query):
    url = record.get("url")
    return dedup.normalize_url(str(url), strip_query) if url else None


def _verified_pairs(group, threshold: float):
    """Candidate pairs of one LSH bucket whose estimated Jaccard reaches the threshold (smaller key first)."""
    _, members = group
    members = sorted({k: s for k, s in members}.items())
    for j in range(1, len(members)):
        for i in range(j):
            if dedup.estimated_jaccard(members[i][1], members[j][1]) >= threshold:
                yield members[i][0], members[j][0]


def _components(_, edges: Iterable[tuple[str, str]]):
    """Union-find over the duplicate pairs: ``(removed key, kept key)`` for every non-minimal member."""
    parent: dict[str, str] = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    for x in sorted(parent):
        root = find(x)
        if root != x:
            yield x, root


def _drop_marked(joined, stage: str, reason: str, chars: int):
    _, groups = joined
    for record in groups["docs"]:
        marks = list(groups["marks"])
        if marks:
            record = dict(record, near_duplicate_of=marks[0])
            yield _removed(stage, reason, record, chars)
        else:
            yield record


class NearDedup(beam.PTransform):
    def __init__(self, cfg, chars: int):
        super().__init__()
        if cfg.bands * cfg.rows != cfg.num_perm:
            raise ValueError(f"near_dedup: bands * rows = {cfg.bands} * {cfg.rows} must equal num_perm = "
                             f"{cfg.num_perm}")
        if not 0.0 < cfg.threshold <= 1.0:
            raise ValueError(f"near_dedup: threshold must be in (0, 1], got {cfg.threshold}")
        self.cfg, self.chars = cfg, chars

    def expand(self, records):
        cfg = self.cfg
        a, b = dedup.permutations(cfg.num_perm, cfg.seed)
        sigs = records | "MinHash" >> beam.Map(lambda r: (r["key"], dedup.minhash(r["text"], cfg.shingle_size, a, b)))
        pairs = (sigs
                 | "Bands" >> beam.FlatMap(lambda ks: [(band, ks) for band in dedup.band_keys(ks[1], cfg.bands,
                                                                                               cfg.rows)])
                 | "Buckets" >> beam.GroupByKey()
                 | "Verify" >> beam.FlatMap(_verified_pairs, cfg.threshold)
                 | "Distinct" >> beam.Distinct())
        marks = (pairs | "One" >> beam.Map(lambda e: (0, e)) | "All" >> beam.GroupByKey()
                 | "Clusters" >> beam.FlatMapTuple(_components))
        keyed = records | "ByKey" >> beam.Map(lambda r: (r["key"], r))
        out = ({"docs": keyed, "marks": marks} | "Join" >> beam.CoGroupByKey()
               | "Drop" >> beam.FlatMap(_drop_marked, "near_dedup", "near_duplicate", self.chars)
               .with_outputs(REMOVED, main="docs"))
        return out.docs, out[REMOVED]


def _line_entries(record: dict, num_buckets: int, min_chars: int):
    bucket = dedup.stable_hash(record["key"]) % max(num_buckets, 1)
    seen = set()
    for line in record["text"].splitlines():
        if len(line.strip()) < min_chars:
            continue
        lk = dedup.line_key(line)
        if lk and lk not in seen:
            seen.add(lk)
            yield (bucket, lk), record["key"]


def _frequent(group, max_repeats: int):
    (_, lk), keys = group
    keys = list(keys)
    if len(keys) > max_repeats:
        for key in keys:
            yield key, lk


def _remove_lines(joined, stage: str, min_chars: int, counter: TokenCounter, chars: int):
    _, groups = joined
    bad = set(groups["lines"])
    for record in groups["docs"]:
        if not bad:
            yield dict(record, lines_removed=0)
            continue
        kept, removed = [], 0
        for line in record["text"].splitlines():
            if len(line.strip()) >= min_chars and dedup.line_key(line) in bad:
                removed += 1
            else:
                kept.append(line)
        if not "".join(kept).strip():
            yield _removed(stage, "all_lines_duplicated", record, chars)
            continue
        text = "\n".join(kept)
        record = dict(record, text=text, lines_removed=removed, ntok=counter(text))
        yield record


class LineDedup(beam.PTransform):
    def __init__(self, cfg, counter: TokenCounter, chars: int):
        super().__init__()
        self.cfg, self.counter, self.chars = cfg, counter, chars

    def expand(self, records):
        cfg = self.cfg
        num_buckets = (records | "Count" >> beam.combiners.Count.Globally()
                       | "Buckets" >> beam.Map(lambda n: max(1, math.ceil(n / cfg.bucket_docs))))
        lines = (records
                 | "Lines" >> beam.FlatMap(_line_entries, beam.pvalue.AsSingleton(num_buckets), cfg.min_line_chars)
                 | "Group" >> beam.GroupByKey()
                 | "Frequent" >> beam.FlatMap(_frequent, cfg.max_repeats))
        keyed = records | "ByKey" >> beam.Map(lambda r: (r["key"], r))
        out = ({"docs": keyed, "lines": lines} | "Join" >> beam.CoGroupByKey()
               | "Remove" >> beam.FlatMap(_remove_lines, "line_dedup", cfg.min_line_chars, self.counter, self.chars)
               .with_outputs(REMOVED, main="docs"))
        return out.docs, out[REMOVED]


def _corpus_vocab(records, cfg):
    """The corpus word distribution (top ``kl_vocab`` words and the total word count) as a singleton."""
    word_counts = (records
                   | "Words" >> beam.FlatMap(lambda r: heuristics.words(r["text"]))
                   | "CountWords" >> beam.combiners.Count.PerElement())
    top = word_counts | "Top" >> beam.combiners.Top.Of(cfg.kl_vocab, key=lambda wc: (wc[1], wc[0]))
    total = word_counts | "Values" >> beam.Values() | "Total" >> beam.CombineGlobally(sum)
    return top | "Vocab" >> beam.Map(lambda t, n: (dict(t), n), beam.pvalue.AsSingleton(total))


# ---- output ------------------------------------------------------------------------------------------------


def output_record(record: dict) -> dict:
    """The JSON object written for a kept document (internal fields dropped)."""
    out = {"text": record["text"]}
    for field in (*PASSTHROUGH_FIELDS, "language", "language_score", "domain", "quality", "lines_removed",
                  "heuristics", "pii"):
        if field in record:
            out[field] = record[field]
    return out


class WriteShard(beam.DoFn):
    """Writes one shard's records in key order to a hidden ``.inprogress`` file, then renames it."""

    def __init__(self, directory: str, num_shards: int):
        self.directory, self.num_shards = directory, num_shards

    def process(self, element):
        from array_record.python import array_record_module  # noqa: PLC0415

        shard, groups = element
        records = sorted(groups["docs"], key=_key_order)
        name = SHARD_PATTERN.format(shard, self.num_shards)
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".{name}.inprogress")
        writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
        try:
            for record in records:
                writer.write(json.dumps(output_record(record), ensure_ascii=False).encode("utf-8"))
        finally:
            writer.close()
        os.replace(tmp, final)
        yield ("shard", name, len(records), os.path.getsize(final))


class _WriteEvents(beam.DoFn):
    def __init__(self, path: str):
        self.path = path

    def process(self, acc):
        tmp = self.path + ".inprogress"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(acc, f)
        os.replace(tmp, self.path)


def _count_event(point: str):
    return lambda records: (records | f"Count/{point}" >> beam.Map(lambda r: ("count", point, 1, r.get("ntok", 0))))


# ---- the pipeline ------------------------------------------------------------------------------------------


def build(pipeline: beam.Pipeline, files: Sequence[str], staging: str, cfg, stage_names: Sequence[str],
          quality_model=None) -> None:
    """Adds the curation transforms for ``files`` writing into ``staging`` to ``pipeline``."""
    counter = TokenCounter(cfg.tokenizer)
    chars = cfg.example_chars
    events = []
    read = (pipeline
            | "Files" >> beam.Create(list(enumerate(files)))
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadJsonl("extract" in stage_names, counter, chars))
            .with_outputs(REMOVED, main="docs"))
    records = read.docs
    events += [read[REMOVED], _count_event("input")(records)]
    for stage in stage_names:
        scfg = cfg[stage]
        if stage == "extract":
            out = records | "extract" >> beam.ParDo(Extract(scfg, counter, chars)).with_outputs(REMOVED, main="docs")
            records, removed = out.docs, out[REMOVED]
        elif stage == "language":
            out = records | "language" >> beam.ParDo(Language(scfg, chars)).with_outputs(REMOVED, main="docs")
            records, removed = out.docs, out[REMOVED]
        elif stage == "url_dedup":
            records, removed = records | "url_dedup" >> _Dedup(
                "url_dedup", functools.partial(_url_key, strip_query=scfg.strip_query), _url_order,
                "older_url_duplicate", chars)
        elif stage == "exact_dedup":
            records, removed = records | "exact_dedup" >> _Dedup(
                "exact_dedup", lambda r, w=scfg.normalize_whitespace: dedup.content_hash(r["text"], w), _key_order,
                "exact_duplicate", chars)
        elif stage == "near_dedup":
            records, removed = records | "near_dedup" >> NearDedup(scfg, chars)
        elif stage == "line_dedup":
            records, removed = records | "line_dedup" >> LineDedup(scfg, counter, chars)
        elif stage == "heuristics":
            vocab = _corpus_vocab(records | "heuristics/Input" >> beam.Map(lambda r: r), scfg)
            out = records | "heuristics" >> beam.ParDo(Heuristics(scfg, chars), beam.pvalue.AsSingleton(vocab)
                                                       ).with_outputs(REMOVED, main="docs")
            records, removed = out.docs, out[REMOVED]
        elif stage == "quality":
            out = (records
                   | "quality/Batch" >> beam.BatchElements(min_batch_size=16, max_batch_size=256)
                   | "quality" >> beam.ParDo(Quality(quality_model, scfg, chars)).with_outputs(REMOVED, main="docs"))
            records, removed = out.docs, out[REMOVED]
        elif stage == "pii":
            records = records | "pii" >> beam.Map(_mask_pii, scfg, counter)
            removed = None
        else:  # pragma: no cover - parse_stages guards this
            raise ValueError(f"unknown stage {stage!r}")
        if removed is not None:
            events.append(removed)
        events.append(_count_event(stage)(records))
    num_shards = cfg.num_shards
    keyed = records | "Shard" >> beam.Map(lambda r: (dedup.stable_hash(r["key"]) % num_shards, r))
    shard_ids = pipeline | "ShardIds" >> beam.Create([(i, None) for i in range(num_shards)])
    written = ({"docs": keyed, "ids": shard_ids} | "GroupShards" >> beam.CoGroupByKey()
               | "Write" >> beam.ParDo(WriteShard(staging, num_shards)))
    events.append(written)
    (tuple(events) | "Events" >> beam.Flatten()
     | "Stats" >> beam.CombineGlobally(stats.StatsCombineFn(cfg.examples_per_reason))
     | "WriteEvents" >> beam.ParDo(_WriteEvents(os.path.join(staging, EVENTS_FILE))))


def match_files(pattern: str) -> list[str]:
    """The files matching ``pattern`` (any Beam filesystem), sorted; an error if there are none."""
    try:
        metadata = FileSystems.match([pattern])[0].metadata_list
    except Exception as e:  # Beam raises BeamIOError for a pattern that matches nothing
        raise FileNotFoundError(f"curate: no input files match {pattern!r}") from e
    files = sorted(m.path for m in metadata if not os.path.basename(m.path).startswith("."))
    if not files:
        raise FileNotFoundError(f"curate: no input files match {pattern!r}")
    return files


def _check_output(output_dir: str, overwrite: bool) -> None:
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise ValueError(f"curate: output {output_dir!r} exists and is not a directory")
        if os.listdir(output_dir) and not overwrite:
            raise ValueError(f"curate: output directory {output_dir!r} already holds results; pass --overwrite "
                             "to replace them")


def _publish(staging: str, output_dir: str) -> None:
    """Moves the finished staging directory to ``output_dir`` (replacing what was there)."""
    old = None
    if os.path.exists(output_dir):
        old = f"{output_dir}.old-{uuid.uuid4().hex[:8]}"
        os.rename(output_dir, old)
    os.rename(staging, output_dir)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def run(input_pattern: str, output_dir: str, cfg=None, stages: str | Sequence[str] | None = None,
        pipeline_args: Sequence[str] = (), overwrite: bool = False) -> dict:
    """Runs the curation pipeline and returns the stats written to ``output_dir/stats.json``.

    ``cfg``: the curation config (default :func:`config.get_config`); ``stages``: overrides ``cfg.stages``;
    ``pipeline_args``: Beam pipeline options (``--runner``, ``--direct_num_workers``, ...).
    """
    cfg = config_lib.get_config() if cfg is None else cfg
    stage_names = config_lib.parse_stages(cfg.stages if stages is None else stages)
    if cfg.num_shards < 1:
        raise ValueError(f"curate: num_shards must be >= 1, got {cfg.num_shards}")
    output_dir = os.path.abspath(os.path.expanduser(output_dir.rstrip("/") or "/"))
    files = match_files(input_pattern)
    _check_output(output_dir, overwrite)
    if cfg.tokenizer and not os.path.exists(cfg.tokenizer):
        raise FileNotFoundError(f"curate: tokenizer file not found: {cfg.tokenizer}")
    if "near_dedup" in stage_names:
        NearDedup(cfg.near_dedup, cfg.example_chars)  # validates bands, rows and threshold before any work
    model = None
    if "quality" in stage_names:
        from llama_jax.data.curation import quality  # noqa: PLC0415

        model = quality.QualityModel.train(cfg.quality.seed_documents, cfg.quality.n_features, cfg.quality.seed)
    options = PipelineOptions(list(pipeline_args))
    options_log = logging.getLogger("apache_beam.options.pipeline_options")
    level = options_log.level
    options_log.setLevel(logging.ERROR)  # Beam warns "Discarding unparseable args"; the error below says it
    try:
        unknown = options.get_all_options(retain_unknown_options=True).keys() - options.get_all_options().keys()
    finally:
        options_log.setLevel(level)
    if unknown:
        raise ValueError(f"curate: unknown pipeline option(s) {sorted(unknown)}")
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    staging = f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(staging)
    try:
        start = time.time()
        pipeline = beam.Pipeline(options=options)
        build(pipeline, files, staging, cfg, stage_names, model)
        result = pipeline.run()
        state = result.wait_until_finish()
        if state not in (None, beam.runners.runner.PipelineState.DONE):
            raise RuntimeError(f"curate: pipeline ended in state {state}")
        elapsed = time.time() - start
        events_path = os.path.join(staging, EVENTS_FILE)
        with open(events_path, encoding="utf-8") as f:
            acc = json.load(f)
        os.remove(events_path)
        result_stats = stats.build(acc, stage_names, TokenCounter(cfg.tokenizer).unit, _plain(cfg))
        result_stats["input"]["pattern"] = input_pattern
        result_stats["seconds"] = round(elapsed, 3)
        stats.plot(result_stats, os.path.join(staging, "stats.png"))
        stats.write_json(result_stats, os.path.join(staging, "stats.json"))
        _publish(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return result_stats


def _plain(cfg) -> dict:
    return json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else dict(cfg)
