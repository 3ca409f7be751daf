"""Data sources: the ``sources`` entries of a data config, and the table of source kinds that reads them.

A source kind is one :class:`SourceKind` in :data:`KINDS` (kind name -> how it is checked and read), its reader
in a module of this package, one per family: ``files`` (``"jsonl"``, ``"text"``), ``array_record``, ``corpus``
(the embedded stdlib corpus), ``passkey`` (synthetic retrieval documents). A new kind is one new module and one
line in the table; :func:`lookup` is the only way in. Nothing here imports JAX or grain at module import, so
config checks can use the table (:data:`BUILTIN`: the kinds that read no files, hence need no ``path``).

Each entry of ``sources`` (a mapping; :meth:`SourceSpec.from_config` validates it):

* ``name`` (str, unique; required),
* ``kind``: ``"corpus"`` (the embedded stdlib corpus, :mod:`llama_jax.data.corpus`), ``"jsonl"`` (one JSON object
  per line), ``"text"`` (each file one document), ``"array_record"`` (one document per record), ``"passkey"``
  (synthetic passkey-retrieval documents, :mod:`llama_jax.data.passkey`),
* ``path``: a file, a directory (all files below it, sorted) or a glob; for ``"corpus"`` the corpus source,
  ``"code"`` or ``"prose"`` (default ``"code"``); files named ``*.jsonl`` under a directory or glob of a
  ``"text"`` source are read as JSON lines,
* ``split``: ``"train"`` (default) / ``"validation"`` select by the stable document hash of
  :func:`llama_jax.data.corpus.is_validation`; ``"all"`` takes every document (the only choice for
  ``"array_record"``, whose files are expected to be split already),
* ``eval_split``: split read by the evaluation iterator (default ``"validation"``; ``"none"`` leaves the source
  out of evaluation, e.g. a synthetic source whose loss should not move a validation gate),
* ``weight`` (float >= 0, default 1.0; zero leaves the source out of training),
* ``text_key``: JSON key of the text (default ``"text"`` for jsonl; for array_record records are raw UTF-8 text
  unless ``text_key`` is given, then each record is a JSON object),
* ``options``: settings of a kind that takes them (``"passkey"``: :func:`llama_jax.data.passkey.check_options`),
* ``packing``: ``"concat"`` (default) or ``"whole"`` (:mod:`llama_jax.data.packing`).

A data config's ``paths`` (source name -> path, ``--config.data.paths.<name>=PATH``) gives named sources their
files: an experiment that declares its mixture by name and leaves the files to the user (the Llama 3 paper
variants) lists its sources with an empty ``path`` and one ``paths`` entry each; :func:`with_paths` fills them in
and :func:`unmapped` names those still empty, so that a run stops before building anything (``train.driver``).

Reading (:attr:`SourceKind.read`) returns a source's documents of one split as a random-access sequence of
texts, in a fixed order: a list (jsonl, text, corpus and passkey sources are read into memory whole) or a lazy
``grain.MapDataset`` (ArrayRecord records are read by index). Text must be UTF-8 and a record's text a JSON
string: a malformed record (invalid JSON or UTF-8, a missing, null or non-string text) is an error; for jsonl
and text sources all of them are counted first and reported in one line naming the first few
(``path:line: reason``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llama_jax.data.sources import array_record, corpus, files, passkey

SPLITS = ("train", "validation", "all")
PACKINGS = ("concat", "whole")


@dataclasses.dataclass(frozen=True)
class SourceKind:
    """How one kind of source is checked and read.

    Attributes:
      read: ``(spec, split, cache_dir) -> documents``: the texts of one split (``"train"``, ``"validation"`` or
        ``"all"``), a random-access sequence in a fixed order; errors name the source. ``cache_dir`` is the
        run's cache (the embedded corpus is built there); kinds that do not need it ignore it.
      needs_path: the source reads files at its ``path`` (a missing ``path`` is a config error); False for
        built-in kinds.
      pre_split: the files are split already, so ``split`` and ``eval_split`` must be ``"all"``.
      check_options: ``(source name, options) -> settings``, raising on bad ``options``; None for kinds that
        take no ``options`` (giving some is then an error).
      check: further checks of a parsed spec (after the generic ones), or None.
    """

    read: Callable[[SourceSpec, str, str | None], Sequence[str]]
    needs_path: bool = True
    pre_split: bool = False
    check_options: Callable[[str, Mapping[str, Any] | None], Any] | None = None
    check: Callable[[SourceSpec], None] | None = None


KINDS: dict[str, SourceKind] = {
    "corpus": SourceKind(read=corpus.read, needs_path=False, check=corpus.check),
    "jsonl": SourceKind(read=files.read),
    "text": SourceKind(read=files.read),
    "array_record": SourceKind(read=array_record.read, pre_split=True),
    "passkey": SourceKind(read=passkey.read, needs_path=False, check_options=passkey.check_options),
}

BUILTIN = frozenset(name for name, kind in KINDS.items() if not kind.needs_path)


def lookup(kind: str, source: str | None = None) -> SourceKind:
    """The :class:`SourceKind` named ``kind``; an unknown kind is an error naming it (and ``source``, if given)."""
    if kind not in KINDS:
        where = f"data source {source!r}: " if source is not None else ""
        raise ValueError(f"{where}unknown kind {kind!r}; expected one of {tuple(KINDS)}")
    return KINDS[kind]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One data source of the config (see the module docstring for the fields)."""

    name: str
    kind: str
    path: str | None = None
    split: str = "train"
    eval_split: str = "validation"
    weight: float = 1.0
    text_key: str | None = None
    options: Mapping[str, Any] | None = None  # settings of a kind that takes them (``passkey``)
    packing: str = "concat"

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], index: int) -> "SourceSpec":
        """The validated spec of config entry number ``index``; a bad entry is an error naming the source."""
        entry = dict(entry)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(entry) - fields
        if unknown:
            raise ValueError(f"data source {index}: unknown keys {sorted(unknown)}; expected {sorted(fields)}")
        if "name" not in entry or not entry["name"]:
            raise ValueError(f"data source {index}: missing 'name'")
        spec = cls(**entry)
        kind = lookup(spec.kind, spec.name)
        for split in (spec.split,) + ((spec.eval_split,) if spec.eval_split != "none" else ()):
            if split not in SPLITS:
                raise ValueError(f"data source {spec.name!r}: unknown split {split!r}")
            if kind.pre_split and split != "all":
                raise ValueError(
                    f"data source {spec.name!r}: {spec.kind} sources are read whole; set split and eval_split "
                    f"to 'all' (got {split!r}) and give pre-split files as separate sources"
                )
        if spec.packing not in PACKINGS:
            raise ValueError(f"data source {spec.name!r}: unknown packing {spec.packing!r}; expected one of {PACKINGS}")
        if kind.check_options is not None:
            kind.check_options(spec.name, spec.options)
        elif spec.options:
            readers = " / ".join(repr(name) for name, k in KINDS.items() if k.check_options is not None)
            raise ValueError(f"data source {spec.name!r}: 'options' are only read by kind {readers}")
        if kind.needs_path and not spec.path:
            raise ValueError(f"data source {spec.name!r}: kind {spec.kind!r} needs a 'path'")
        if kind.check is not None:
            kind.check(spec)
        w = spec.weight
        if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"data source {spec.name!r}: weight must be a finite number >= 0, got {w!r}")
        return spec


def config_value(cfg: Any, key: str, default: Any = None) -> Any:
    """``cfg[key]`` of a data config given as a mapping or an attribute object (``ConfigDict``), else ``default``."""
    if isinstance(cfg, Mapping):
        return cfg.get(key, default)
    return getattr(cfg, key, default) if hasattr(cfg, key) else default


def parse_sources(cfg: Any, key: str = "sources") -> list[SourceSpec]:
    """Validated :class:`SourceSpec` list from ``cfg[key]``; names must be unique."""
    entries = config_value(cfg, key)
    if not entries:
        raise ValueError(f"data config has no {key!r}")
    specs = [SourceSpec.from_config(e, i) for i, e in enumerate(entries)]
    names = [s.name for s in specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate data source names: {duplicates}")
    return specs


def with_paths(entries: Sequence[Mapping[str, Any]], paths: Mapping[str, str] | None) -> list[dict]:
    """The source entries with each one that ``paths`` names (``data.paths``: source name -> path) given that
    path; an empty or absent mapping leaves a source's own ``path``."""
    paths = dict(paths or {})
    return [dict(e, path=paths[e["name"]]) if paths.get(e.get("name")) else dict(e) for e in entries]


def reweighted(entries: Sequence[Mapping[str, Any]], weights: Mapping[str, float] | None) -> list[dict]:
    """The source entries with the weights ``weights`` names (a phase's mixture: source name -> weight) in place
    of their own; a name that is no source, a weight that is not a finite number >= 0, or no positive weight left
    is an error naming it."""
    weights = dict(weights or {})
    names = [e.get("name") for e in entries]
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"mixture weights name unknown data source(s) {unknown}; sources: {names}")
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"mixture weight of data source {name!r} must be a finite number >= 0, got {w!r}")
    out = [dict(e, weight=float(weights[e["name"]])) if e.get("name") in weights else dict(e) for e in entries]
    if weights and not any(float(e.get("weight", 1.0)) > 0 for e in out):
        raise ValueError(f"mixture weights {weights} leave every data source at weight 0")
    return out


def unmapped(cfg: Any) -> list[str]:
    """The names of a data config's sources whose files the user has not given yet: named in ``paths`` and with
    no path once :func:`with_paths` has applied them (in source order)."""
    paths = dict(config_value(cfg, "paths") or {})
    entries = with_paths(config_value(cfg, "sources") or [], paths)
    return [e["name"] for e in entries if e.get("name") in paths and not e.get("path")]


__all__ = ["BUILTIN", "KINDS", "PACKINGS", "SPLITS", "SourceKind", "SourceSpec", "config_value", "lookup",
           "parse_sources", "reweighted", "unmapped", "with_paths"]
