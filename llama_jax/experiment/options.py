"""Typed stage options: the base class every kind's options extend, `StageRef`, and the one parser.

A kind declares its settings as a frozen dataclass (`llama_jax.stages.options`); `parse(cls, stage, kind, raw)`
turns the config's `options` mapping into it once, when the experiment is resolved, so nothing downstream
re-reads or re-casts a dict. Field types drive the conversion:

    bool, int, float, str      converted once (a bool also from "true" / "false")
    Spec                       a file written by an earlier stage (`stage:<name>/<file>`, a `StageRef`) or a
                               path; `field(metadata=FILE)` / `DIR` makes a path that does not exist an error
    tuple[T, ...]              a list stays a list (a tuple); a comma-separated string (a command-line
                               override) is split
Each field's default lives on its dataclass only. Checks of one value against another go in the dataclass's
`__post_init__` (a `ValueError` there is reported with the stage and kind); `REQUIRED` fields must be non-empty.

Three settings are read by the driver and `resolve`, not by the kind, so every options class has them, as
class attributes the kinds that take them override with fields: `start_from` (an earlier stage whose final
parameters the stage starts from instead of the previous stage's, or `START_FROM_INIT`, "init_from": the model
`config.init_from` names, e.g. the pretrained model of a post-training run), `carry_optimizer` (AdamW's
moments carried over from the stage it starts from) and `continue_data` (that stage's document stream
continued).
"""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Mapping, Union

STAGE_PREFIX = "stage:"
START_FROM_INIT = "init_from"  # `start_from` value: the run's starting model (config.init_from)
REQUIRED = {"required": True}
FILE = {"exists": "file"}
DIR = {"exists": "dir"}


@dataclasses.dataclass(frozen=True)
class StageRef:
    """`stage:<name>[/<file>]`: an earlier stage of this run (its checkpoints), or a file it wrote."""

    stage: str
    file: str = ""

    @classmethod
    def parse(cls, text: str) -> "StageRef":
        name, _, file = text[len(STAGE_PREFIX):].partition("/")
        if not text.startswith(STAGE_PREFIX) or not name:
            raise ValueError(f"{text!r} is not 'stage:<name>[/<file>]'")
        return cls(name, file)

    def __str__(self) -> str:
        return f"{STAGE_PREFIX}{self.stage}" + (f"/{self.file}" if self.file else "")


Spec = Union[str, StageRef]  # a path, or a stage reference


@dataclasses.dataclass(frozen=True)
class StageOptions:
    """Options of a kind that takes none; the base of every kind's options."""

    start_from = ""  # an earlier stage to start from (default: the previous stage)
    carry_optimizer = False  # the optimizer state of the stage it starts from carried over
    continue_data = False  # the data stream of the stage it starts from continued


def references(options: StageOptions) -> list[str]:
    """The earlier stages whose outputs an options object reads (its `StageRef` values)."""
    out = []
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        for one in value if isinstance(value, tuple) else (value,):
            if isinstance(one, StageRef):
                out.append(one.stage)
    return out


def parse(cls: type, stage: str, kind: str, raw: Mapping[str, Any]) -> StageOptions:
    """`raw` (the config's options) as a `cls` instance; errors name the stage, the kind and the option."""
    where = f"stage {stage!r} ({kind})"
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown and not fields:
        raise ValueError(f"{where}: kind {kind!r} takes no options, got {sorted(raw)}")
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(fields) or 'none'}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        try:
            values[name] = _convert(value, hints[name], fields[name].metadata)
        except (TypeError, ValueError, FileNotFoundError) as e:
            error = FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError
            raise error(f"{where}: options.{name}={_shown(value)}: {e}") from None
    for name, f in fields.items():
        if f.metadata.get("required") and not values.get(name):
            raise ValueError(f"{where}: options.{name} is required")
    try:
        return cls(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _shown(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return repr([str(v) for v in value])
    return repr(value)


def _convert(value: Any, kind: Any, metadata: Mapping[str, Any]) -> Any:
    origin = typing.get_origin(kind)
    if origin is tuple:
        (element, _) = typing.get_args(kind)
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value else []
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"expected a list, got {type(value).__name__}")
        return tuple(_convert(v, element, metadata) for v in value)
    if kind == Spec:
        if isinstance(value, StageRef):
            return value
        if not isinstance(value, str):
            raise TypeError(f"expected a path or 'stage:<name>[/<file>]', got {type(value).__name__}")
        if value.startswith(STAGE_PREFIX):
            return StageRef.parse(value)
        if not value.strip():
            if metadata.get("exists"):
                raise ValueError("an empty entry")
            return value
        exists = metadata.get("exists")
        if (exists == "file" and not os.path.isfile(value)) or (exists == "dir" and not os.path.isdir(value)):
            raise FileNotFoundError(f"{value!r} does not exist")
        return value
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, (bool, int)) and value in (0, 1):
            return bool(value)
        raise TypeError(f"expected a bool, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):
            raise TypeError(f"expected a {kind.__name__}, got a bool")
        out = kind(value)
        if kind is int and isinstance(value, float) and out != value:
            raise ValueError(f"expected an int, got {value!r}")
        return out
    if kind is str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {type(value).__name__}")
        return value
    raise TypeError(f"option type {kind!r} is not supported")


__all__ = ["DIR", "FILE", "REQUIRED", "STAGE_PREFIX", "START_FROM_INIT", "Spec", "StageOptions", "StageRef", "parse",
           "references"]
