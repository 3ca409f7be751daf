"""A rate-limited one-line console status with elapsed time and ETA."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax

from llama_jax.train.metrics.writer import to_float


def format_duration(seconds: float) -> str:
    """45 -> '45s', 62 -> '1m02s', 3723 -> '1h02m03s', 93784 -> '1d02h03m'; unknown/negative -> '?'."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def _si(x: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{suffix}"
    return f"{x:.1f}"


def _format_scalar(name: str, x: float) -> str:
    if not math.isfinite(x):
        return f"{name} {x}"
    if name == "lr" or name.endswith("learning_rate"):
        return f"{name} {x:.1e}"
    if name in ("tokens_per_s", "tok/s"):
        return f"tok/s {_si(x)}"
    if name == "mfu":
        return f"mfu {100 * x:.1f}%"
    return f"{name} {x:.4g}"


class Progress:
    """Console progress: `[desc] step 120/400 (30.0%) loss 4.213 lr 1.0e-03 tok/s 5.1k mfu 12.3% | elapsed
    1m02s eta 2m25s`, printed at most every `every_s` seconds (the first update and the last step always).

    The ETA uses only the steps run by this process (from `start_step`, so a resumed run estimates correctly);
    once two updates have been seen it times from the first one, leaving compilation out of the rate.
    `scalars` formatting: `lr` in scientific notation, `tokens_per_s` as tok/s with k/M suffixes, `mfu` (a
    fraction) as a percentage, anything else with 4 significant digits.
    """

    def __init__(self, total_steps: int, start_step: int = 0, desc: str = "", every_s: float = 10.0,
                 stream: TextIO = sys.stderr, clock: Callable[[], float] = time.monotonic,
                 process_index: int | None = None):
        self.active = (jax.process_index() if process_index is None else int(process_index)) == 0  # one console line
        self.total_steps = int(total_steps)
        self.start_step = int(start_step)
        self.desc = desc
        self.every_s = float(every_s)
        self.stream = stream
        self.clock = clock
        self._t0 = clock()
        self._first: tuple[int, float] | None = None
        self._last_print: float | None = None

    def eta_seconds(self, step: int, now: float) -> float:
        remaining = self.total_steps - step
        if remaining <= 0:
            return 0.0
        base_step, base_t = self.start_step, self._t0
        if self._first is not None and step > self._first[0]:
            base_step, base_t = self._first
        done, dt = step - base_step, now - base_t
        if done <= 0 or dt <= 0:
            return math.nan
        return remaining * dt / done

    def format_line(self, step: int, scalars: Mapping[str, Any], now: float) -> str:
        parts = [f"[{self.desc}]"] if self.desc else []
        pct = 100.0 * step / self.total_steps if self.total_steps > 0 else 100.0
        parts.append(f"step {step}/{self.total_steps} ({pct:.1f}%)")
        parts += [_format_scalar(str(k), to_float(str(k), v)) for k, v in scalars.items()]
        parts.append(f"| elapsed {format_duration(now - self._t0)} eta {format_duration(self.eta_seconds(step, now))}")
        return " ".join(parts)

    def update(self, step: int, scalars: Mapping[str, Any] | None = None) -> bool:
        """Prints the status line if due; returns whether it printed."""
        step, now = int(step), self.clock()
        due = (self._last_print is None or now - self._last_print >= self.every_s or step >= self.total_steps)
        if due and self.active:
            self.stream.write(self.format_line(step, scalars or {}, now) + "\n")
            self.stream.flush()
            self._last_print = now
        if self._first is None:
            self._first = (step, now)
        return due
