"""The run directory: the one owner of its layout (every path of a run) and its JSON files; it loads no model
(`llama_jax.train.resume.load_workdir` reads a workdir as a checkpoint).

    <workdir>/.lock                              held by the live run (`WorkdirLock`: one writer per workdir)
    <workdir>/config.json                        the experiment config (written when the run first starts,
                                                 and again only when a changed config is accepted and a
                                                 stage then runs)
    <workdir>/tokenizer.model                    the run's tokenizer (Meta format)
    <workdir>/metrics.jsonl                      one JSON object per logged step (`step`, `<stage>/train/loss`, ...)
    <workdir>/data_cache/                        the embedded corpus and default tokenizer (unless data.cache_dir)
    <workdir>/stages/<name>/model_config.json    the ModelConfig the stage's checkpoints hold
    <workdir>/stages/<name>/checkpoints/<step>/  Orbax checkpoints (llama_jax.train.checkpoint)
    <workdir>/stages/<name>/DONE.json            written when the stage finished: its final metrics
    <workdir>/stages/<name>/batches.jsonl        CRC of every batch (config.debug.log_batches)
    <workdir>/stages/<name>/<output>             files a stage writes for later ones (rejection sampling:
                                                 sft.jsonl, preferences.jsonl, stats.json)
"""

from __future__ import annotations

import json
import os
from typing import Any

CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
METRICS = "metrics.jsonl"
STAGES = "stages"
DONE = "DONE.json"
MODEL_CONFIG = "model_config.json"
BATCHES = "batches.jsonl"
LOCK = ".lock"

# Config keys that define what the checkpoints hold and which data they saw. Changing one of them under an
# existing workdir is refused unless explicitly allowed; the others (intervals, eval, samples, mesh, caches,
# debug aids) may change between restarts.
DEFINING_KEYS = ("seed", "model", "tokenizer", "data.sources", "data.paths", "data.shuffle", "stages", "init_from",
                 "init_stage", "prepare")


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG)


def tokenizer_path(workdir: str) -> str:
    return os.path.join(workdir, TOKENIZER)


def metrics_path(workdir: str) -> str:
    return os.path.join(workdir, METRICS)


def data_cache_dir(workdir: str, configured: str = "") -> str:
    return configured or os.path.join(workdir, "data_cache")


def stage_dir(workdir: str, stage: str) -> str:
    return os.path.join(workdir, STAGES, stage)


def checkpoints_dir(workdir: str, stage: str) -> str:
    return os.path.join(stage_dir(workdir, stage), "checkpoints")


def done_path(workdir: str, stage: str) -> str:
    return os.path.join(stage_dir(workdir, stage), DONE)


def batches_path(workdir: str, stage: str) -> str:
    return os.path.join(stage_dir(workdir, stage), BATCHES)


def model_config_path(workdir: str, stage: str) -> str:
    return os.path.join(stage_dir(workdir, stage), MODEL_CONFIG)


def is_workdir(path: str) -> bool:
    """A training workdir: the run's config.json plus stages/<name>/."""
    return os.path.isfile(config_path(path)) and os.path.isdir(os.path.join(path, STAGES))


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def read_config(workdir: str):
    import ml_collections  # noqa: PLC0415
    with open(config_path(workdir)) as f:
        return ml_collections.ConfigDict(json.load(f))


def write_config(workdir: str, config) -> None:
    tmp = config_path(workdir) + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=1, sort_keys=True))
    os.replace(tmp, config_path(workdir))


def read_done(workdir: str, stage: str) -> dict | None:
    """A finished stage's DONE.json, or None; an unreadable one is an error naming the file."""
    path = done_path(workdir, stage)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            done = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a stage's record (invalid JSON: {e}); move it aside to run the stage "
                         "again") from None
    if not isinstance(done, dict):
        raise ValueError(f"{path} is not a stage's record (a JSON {type(done).__name__}, not an object)")
    return done


class WorkdirBusy(ValueError):
    """Another live run holds the workdir."""


class WorkdirLock:
    """One writer per workdir: an exclusive `flock` on `<workdir>/.lock`, held while the run lives. The kernel
    releases it when the holding process ends, however it ends, so a killed run never leaves it stale; the file
    records the holder (host, pid, start time) for the error another run gets. Taken by process 0 of a job."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, LOCK)
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        import fcntl  # noqa: PLC0415 - POSIX only
        import socket  # noqa: PLC0415
        import time  # noqa: PLC0415

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", errors="replace").strip() or "unknown"
            os.close(fd)
            raise WorkdirBusy(f"workdir {os.path.dirname(self.path)!r} is in use by another run ({holder}): wait "
                              "for it to end, or use another workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"host {socket.gethostname()}, pid {os.getpid()}, since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(value, (list, tuple)):
        out = {f"{prefix}": len(value)} if not value or isinstance(value[0], dict) else {prefix: list(value)}
        if value and isinstance(value[0], dict):
            for i, v in enumerate(value):
                out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: value}


def config_differences(stored, new) -> list[str]:
    """`key: old -> new` for every defining key (DEFINING_KEYS) that differs between two experiment configs."""
    old_flat = _flatten(json.loads(stored.to_json_best_effort()))
    new_flat = _flatten(json.loads(new.to_json_best_effort()))
    out = []
    for key in sorted(set(old_flat) | set(new_flat)):
        if not any(key == d or key.startswith(d + ".") or key.startswith(d + "[") for d in DEFINING_KEYS):
            continue
        a, b = old_flat.get(key, "<absent>"), new_flat.get(key, "<absent>")
        if a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out


def write_model_config(workdir: str, stage: str, cfg) -> None:
    import dataclasses  # noqa: PLC0415
    write_json_atomic(model_config_path(workdir, stage), dataclasses.asdict(cfg))


def stage_output_path(workdir: str, stage: str, name: str) -> str:
    """A file a stage writes for later stages (rejection sampling's `sft.jsonl`, `preferences.jsonl`, ...)."""
    return os.path.join(stage_dir(workdir, stage), name)
