"""The ``corpus`` source kind: the embedded stdlib corpus (:mod:`llama_jax.data.corpus`), built in the cache dir.

``path`` names the corpus source, ``"code"`` (default) or ``"prose"``; ``split`` ``"all"`` is the train split
followed by the validation split. The corpus is built (or read from its cache) under ``cache_dir``, the run's
workdir, which must be given.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llama_jax.data import corpus as corpus_lib

if TYPE_CHECKING:
    from llama_jax.data.sources import SourceSpec


def check(spec: SourceSpec) -> None:
    """``path``, when given, names a corpus source."""
    if spec.path not in (None, *corpus_lib.SOURCES):
        raise ValueError(f"data source {spec.name!r}: corpus path must be one of {corpus_lib.SOURCES}")


def read(spec: SourceSpec, split: str, cache_dir: str | None) -> list[str]:
    """The corpus source's documents of ``split``."""
    if not cache_dir:
        raise ValueError(f"data source {spec.name!r}: corpus sources need data.cache_dir (the workdir)")
    texts = corpus_lib.load_documents(cache_dir, spec.path or "code", "train" if split == "all" else split)
    if split == "all":
        texts += corpus_lib.load_documents(cache_dir, spec.path or "code", "validation")
    return texts
