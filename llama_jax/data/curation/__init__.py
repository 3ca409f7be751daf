"""Data curation on Apache Beam after the families of Llama 3 §3.1.1: HTML extraction, language ID, URL / exact /
near / line dedup, heuristic and model-based filters, PII masking, per-stage statistics. The quality model,
language ID (py3langid, English only by default) and PII handling (masking, not the paper's domain removal) are
substitutes for the paper's: the README's curation table says which and why.

Entry point: ``python -m llama_jax.curate --input=GLOB --output=DIR``; Python: :func:`run`. Stage order and
thresholds: :mod:`llama_jax.data.curation.config`. The output shards are read by the training pipeline as an
``array_record`` source with ``text_key="text"`` and ``path="DIR/part-*.array_record"``.
"""

from llama_jax.data.curation.config import STAGES, get_config, parse_stages


def run(*args, **kwargs):
    """:func:`llama_jax.data.curation.pipeline.run` (imports Beam on first use)."""
    from llama_jax.data.curation import pipeline  # noqa: PLC0415

    return pipeline.run(*args, **kwargs)


__all__ = ["STAGES", "get_config", "parse_stages", "run"]
