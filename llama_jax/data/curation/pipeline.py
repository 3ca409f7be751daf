"""The curation pipeline on Apache Beam: read jsonl -> the selected stages in order -> ArrayRecord shards +
``stats.json`` + ``stats.png``.

The stages are a table (:data:`STAGE_TRANSFORMS`, stage name -> transform class); the pipeline reads the input
(:mod:`~llama_jax.data.curation.reading`), applies each selected stage (:mod:`~llama_jax.data.curation.transforms`,
:mod:`~llama_jax.data.curation.dedup_transforms`), counts documents and tokens after each, and writes the shards
and the combined stats (:mod:`~llama_jax.data.curation.writing`). Adding a stage: its transform (the stage
shape in :mod:`~llama_jax.data.curation.transforms`), its line in the table, and its name (position in the
order) and settings in :mod:`~llama_jax.data.curation.config`.

The same code runs on the DirectRunner (one machine, ``--direct_num_workers``) and on distributed runners
(``--runner=DataflowRunner|FlinkRunner|SparkRunner`` with their options); the output directory must then be on a
filesystem all workers share. Every choice is deterministic and independent of how the work is split (document
keys, see :mod:`~llama_jax.data.curation.records`), so 1 and N workers write byte-identical shards. Output
records: ``text``, the input's ``url`` / ``id`` / ``date`` when present, and the scores the stages computed
(``language``, ``language_score``, ``heuristics``, ``quality``, ``domain``, ``lines_removed``, ``pii``). A
failed run leaves ``OUTPUT`` untouched (staging and publish: :mod:`~llama_jax.data.curation.writing`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions

from llama_jax.data.curation import config as config_lib
from llama_jax.data.curation import dedup, dedup_transforms, reading, stats, transforms, writing
from llama_jax.data.curation.records import REMOVED, StageContext, TokenCounter

STAGE_TRANSFORMS: dict[str, type[beam.PTransform]] = {
    "extract": transforms.Extract,
    "language": transforms.Language,
    "url_dedup": dedup_transforms.UrlDedup,
    "exact_dedup": dedup_transforms.ExactDedup,
    "near_dedup": dedup_transforms.NearDedup,
    "line_dedup": dedup_transforms.LineDedup,
    "heuristics": transforms.Heuristics,
    "quality": transforms.Quality,
    "pii": transforms.Pii,
}
"""Stage name -> its transform, built as ``cls(cfg.<stage>, StageContext)``; the keys are ``config.STAGES``."""

if tuple(STAGE_TRANSFORMS) != config_lib.STAGES:
    raise ImportError(f"curation: the stage table {list(STAGE_TRANSFORMS)} and config.STAGES "
                      f"{list(config_lib.STAGES)} must name the same stages in the same order")


def make_stages(cfg, stage_names: Sequence[str]) -> list[tuple[str, beam.PTransform]]:
    """``(name, transform)`` of each selected stage, built before any work: a stage's settings are checked (and
    the quality classifiers fitted) here, in the launching process."""
    ctx = StageContext(counter=TokenCounter(cfg.tokenizer), chars=cfg.example_chars)
    return [(name, STAGE_TRANSFORMS[name](cfg[name], ctx)) for name in stage_names]


def _count_events(records, point: str):
    return records | f"Count/{point}" >> beam.Map(lambda r: ("count", point, 1, r.get("ntok", 0)))


def build(pipeline: beam.Pipeline, files: Sequence[str], staging: str, cfg,
          stages: Sequence[tuple[str, beam.PTransform]]) -> None:
    """Adds reading ``files``, the ``stages`` (:func:`make_stages`) and writing into ``staging`` to ``pipeline``."""
    counter = TokenCounter(cfg.tokenizer)
    names = [name for name, _ in stages]
    read = (pipeline
            | "Files" >> beam.Create(list(enumerate(files)))
            | "SpreadFiles" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(reading.ReadJsonl("extract" in names, counter, cfg.example_chars))
            .with_outputs(REMOVED, main="docs"))
    records = read.docs
    events = [read[REMOVED], _count_events(records, "input")]
    for name, transform in stages:
        records, removed = records | name >> transform
        if removed is not None:
            events.append(removed)
        events.append(_count_events(records, name))
    num_shards = cfg.num_shards
    keyed = records | "Shard" >> beam.Map(lambda r: (dedup.stable_hash(r["key"]) % num_shards, r))
    shard_ids = pipeline | "ShardIds" >> beam.Create([(i, None) for i in range(num_shards)])
    written = ({"docs": keyed, "ids": shard_ids} | "GroupShards" >> beam.CoGroupByKey()
               | "Write" >> beam.ParDo(writing.WriteShard(staging, num_shards)))
    events.append(written)
    (tuple(events) | "Events" >> beam.Flatten()
     | "Stats" >> beam.CombineGlobally(stats.StatsCombineFn(cfg.examples_per_reason))
     | "WriteEvents" >> beam.ParDo(writing.WriteEvents(os.path.join(staging, writing.EVENTS_FILE))))


def _pipeline_options(pipeline_args: Sequence[str]) -> PipelineOptions:
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
    return options


def run(input_pattern: str, output_dir: str, cfg=None, stages: str | Sequence[str] | None = None,
        pipeline_args: Sequence[str] = (), overwrite: bool = False) -> dict:
    """Runs the curation pipeline and returns the stats written to ``output_dir/stats.json``.

    Bad input records are skipped and counted (``bad_input``, ``bad_input_first``; the CLI warns in one line). An
    input without any valid record raises ``ValueError`` naming it, the counts and the first bad record; an output
    that cannot be written raises ``NotADirectoryError`` / ``PermissionError`` naming it before any work. A run
    that raises writes nothing (no output, no staging directory, no parent folder it made).

    ``cfg``: the curation config (default :func:`config.get_config`); ``stages``: overrides ``cfg.stages``;
    ``pipeline_args``: Beam pipeline options (``--runner``, ``--direct_num_workers``, ...).
    """
    cfg = config_lib.get_config() if cfg is None else cfg
    stage_names = config_lib.parse_stages(cfg.stages if stages is None else stages)
    if cfg.num_shards < 1:
        raise ValueError(f"curate: num_shards must be >= 1, got {cfg.num_shards}")
    output_dir = os.path.abspath(os.path.expanduser(output_dir.rstrip("/") or "/"))
    files = reading.match_files(input_pattern)
    writing.check_output(output_dir, overwrite)
    if cfg.tokenizer and not os.path.exists(cfg.tokenizer):
        raise FileNotFoundError(f"curate: tokenizer file not found: {cfg.tokenizer}")
    stage_transforms = make_stages(cfg, stage_names)
    options = _pipeline_options(pipeline_args)
    staging = writing.Staging.create(output_dir)
    try:
        start = time.time()
        pipeline = beam.Pipeline(options=options)
        build(pipeline, files, staging.path, cfg, stage_transforms)
        result = pipeline.run()
        state = result.wait_until_finish()
        if state not in (None, beam.runners.runner.PipelineState.DONE):
            raise RuntimeError(f"curate: pipeline ended in state {state}")
        elapsed = time.time() - start
        events_path = os.path.join(staging.path, writing.EVENTS_FILE)
        with open(events_path, encoding="utf-8") as f:
            acc = json.load(f)
        os.remove(events_path)
        result_stats = stats.build(acc, stage_names, TokenCounter(cfg.tokenizer).unit, _plain(cfg))
        result_stats["input"]["pattern"] = input_pattern
        result_stats["seconds"] = round(elapsed, 3)
        error = stats.no_valid_record(result_stats)
        if error:
            raise ValueError(error)
        stats.plot(result_stats, os.path.join(staging.path, "stats.png"))
        stats.write_json(result_stats, os.path.join(staging.path, "stats.json"))
        staging.publish()
    except BaseException:
        staging.discard()
        raise
    return result_stats


def _plain(cfg) -> dict:
    return json.loads(cfg.to_json()) if hasattr(cfg, "to_json") else dict(cfg)
