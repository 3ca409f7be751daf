"""Metric writers: scalars and text to TensorBoard (`<workdir>/tensorboard/`) and to a JSON-lines file
(`<workdir>/metrics.jsonl`, one strict-JSON object per line, flushed on every write, appended to on resume).
Only process 0 writes. `read_jsonl` reads the file back."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any, TextIO

import jax
import numpy as np
from absl import logging


def to_float(name: str, value: Any) -> float:
    """A host float from a scalar metric (a Python number or a one-element array); TypeError names the metric."""
    try:
        arr = np.asarray(jax.device_get(value))
    except Exception as e:  # noqa: BLE001  (report which metric failed)
        raise TypeError(f"metric {name!r}: cannot convert {type(value).__name__} to a float") from e
    if arr.size != 1 or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise TypeError(f"metric {name!r} must be a real scalar, got {arr.dtype} of shape {arr.shape}")
    return float(arr.reshape(()))


def _json_value(x: float) -> float | None:
    return x if math.isfinite(x) else None


class MetricWriter:
    """Writes scalars and text to TensorBoard and to a JSON-lines file under `workdir`; only process 0 writes.

    Each JSON line is `{"step": s, "<prefix>/<name>": value, ..., "time": unix_seconds}`; non-finite values are
    written as `null` (strict JSON) while TensorBoard still receives them. Both are flushed on every write, so a
    killed run keeps everything written so far. Reopening appends; a partial final line left by a kill in the
    middle of a write (no newline) is dropped first, with a warning, so the file stays one object per line.
    """

    def __init__(self, workdir: str, tensorboard: bool = True, jsonl_name: str = "metrics.jsonl",
                 process_index: int | None = None):
        self.workdir = os.fspath(workdir)
        self.process_index = jax.process_index() if process_index is None else int(process_index)
        self.active = self.process_index == 0
        self.jsonl_path = os.path.join(self.workdir, jsonl_name)
        self._file: TextIO | None = None
        self._tb = None
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        _drop_partial_last_line(self.jsonl_path)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")
        if tensorboard:
            from tensorboardX import SummaryWriter
            # The event file name has one-second resolution and is opened "wb": a unique suffix keeps a quick
            # restart from overwriting the previous run's events.
            self._tb = SummaryWriter(logdir=os.path.join(self.workdir, "tensorboard"), flush_secs=30,
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def _append(self, record: dict) -> None:
        record["time"] = time.time()
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()

    def write_scalars(self, step: int, scalars: Mapping[str, Any], prefix: str = "") -> None:
        if not self.active or self._file is None:
            return
        step = int(step)
        prefix = prefix.rstrip("/")
        values = {(f"{prefix}/{k}" if prefix else str(k)): to_float(str(k), v) for k, v in scalars.items()}
        if self._tb is not None:
            for tag, x in values.items():
                self._tb.add_scalar(tag, x, global_step=step)
            self._tb.flush()
        self._append({"step": step, **{tag: _json_value(x) for tag, x in values.items()}})

    def write_text(self, step: int, tag: str, text: str) -> None:
        if not self.active or self._file is None:
            return
        step = int(step)
        if self._tb is not None:
            self._tb.add_text(tag, str(text), global_step=step)
            self._tb.flush()
        self._append({"step": step, tag: str(text)})

    def drop_after(self, step: int, prefix: str) -> None:
        """Removes the JSON-lines rows of `prefix` (a stage name) with a step after `step`: a stage resumed from
        its checkpoint at `step` writes those steps again, so a resumed run never holds a step twice. The file
        is rewritten atomically (a temporary file renamed into place)."""
        if not self.active or self._file is None:
            return
        self._file.close()
        keep, dropped = [], 0
        with open(self.jsonl_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    keep.append(line)
                    continue
                if int(record.get("step", -1)) > step and any(k.startswith(prefix + "/") for k in record):
                    dropped += 1
                else:
                    keep.append(line)
        if dropped:
            tmp = self.jsonl_path + f".tmp{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(keep)
            os.replace(tmp, self.jsonl_path)
            logging.info("%s: dropped %d rows of %s after step %d (the resumed stage writes them again)",
                         self.jsonl_path, dropped, prefix, step)
        self._file = open(self.jsonl_path, "a", encoding="utf-8")

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_partial_last_line(path: str) -> None:
    """Removes a trailing fragment without a newline (a write cut by a kill); complete lines are untouched."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        # Find the start of the fragment: the byte after the last newline.
        pos, keep, chunk = size, 0, 1 << 16
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            idx = f.read(pos - start).rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        logging.warning("%s: dropping a partial final line (%d bytes) left by an interrupted write",
                        path, size - keep)
        f.truncate(keep)


def read_jsonl(path: str) -> list[dict]:
    """Reads a metrics file back. A truncated final line (a kill mid-write) is skipped with a warning; a bad
    line anywhere else raises ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                logging.warning("%s: skipping a truncated final line %d (%s)", path, i + 1, e)
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON object: {e}") from e
    return records
