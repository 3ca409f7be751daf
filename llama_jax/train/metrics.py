"""Training metrics: device peak FLOP/s, throughput and MFU, metric writers and a console progress line.

  * `device_peak_flops(dtype, device)` gives the per-device dense peak used as the MFU denominator: a datasheet
    figure for known accelerators (no sparsity), otherwise `measure_matmul_peak(dtype)`, a timed square matmul.
    `PeakFlops` keeps a measured peak honest (best recorded per machine, shared among simulated CPU devices,
    re-measured when a step comes close, never below an achieved rate).
    Float32 on accelerators is always measured (the GPU "TF32" figures are not float32 peaks).
  * `Throughput` turns (tokens, seconds) per step into tokens/s, TFLOP/s per device and MFU, per step and
    smoothed over a window of recent steps.
  * `MetricWriter` writes scalars and text to TensorBoard (`<workdir>/tensorboard/`) and to a JSON-lines file
    (`<workdir>/metrics.jsonl`, one strict-JSON object per line, flushed on every write, appended to on resume).
    Only process 0 writes. `read_jsonl` reads the file back.
  * `Progress` prints a rate-limited one-line status with elapsed time and ETA.

None of this runs inside a jitted step; the loop calls it with host values.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

# ------------------------------------------------------------------------------------------- peak FLOP/s

# Dense (no sparsity) datasheet peaks per device, by dtype family. Matched against `device.device_kind`
# (case-insensitive) in order, so the more specific patterns come first.
_DATASHEET: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r"h100.*pcie", "NVIDIA H100 PCIe", {"bf16": 756e12, "fp16": 756e12, "fp8": 1513e12}),
    (r"h100.*nvl", "NVIDIA H100 NVL", {"bf16": 835e12, "fp16": 835e12, "fp8": 1670e12}),
    (r"h100", "NVIDIA H100", {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}),  # SXM
    (r"h200", "NVIDIA H200", {"bf16": 989e12, "fp16": 989e12, "fp8": 1979e12}),  # also GH200
    (r"a100", "NVIDIA A100", {"bf16": 312e12, "fp16": 312e12}),
    (r"\bl4\b", "NVIDIA L4", {"bf16": 121e12, "fp16": 121e12}),  # not L40 / L40S
    (r"^tpu v4$", "TPU v4", {"bf16": 275e12}),  # not "TPU v4 lite" (v4i)
    (r"^tpu v5( lite|e)$", "TPU v5e", {"bf16": 197e12}),
    (r"^tpu v5p?$", "TPU v5p", {"bf16": 459e12}),
    (r"^tpu v6( lite|e)$|trillium", "TPU v6e", {"bf16": 918e12}),
)

_DTYPE_FAMILY = {"bfloat16": "bf16", "float16": "fp16"}

_MEASURED_CACHE: dict[tuple[str, str, str, int], float] = {}


def _dtype_name(dtype: Any) -> str:
    try:
        return np.dtype(dtype).name
    except TypeError as e:
        raise ValueError(f"unknown dtype {dtype!r}") from e


def _dtype_family(name: str) -> str | None:
    if name.startswith("float8"):
        return "fp8"
    return _DTYPE_FAMILY.get(name)


def _default_device():
    return jax.local_devices()[0]


def _default_matmul_size(platform: str) -> int:
    # CPU: ~2 GFLOP per matmul, well under a second for warm-up + repeats on two cores.
    return 1024 if platform == "cpu" else 8192


def measure_matmul_peak(dtype: Any = "float32", size: int | None = None, repeats: int = 5,
                        device: Any | None = None, fresh: bool = False) -> float:
    """Measured dense matmul FLOP/s of one device: a jitted [size, size] @ [size, size] in `dtype`.

    One warm-up call (compilation), then the fastest of `repeats` timed calls (each `block_until_ready`): a peak
    is the best the device was seen to do, so that MFU is never flattered by a slow measurement.
    `size` defaults to 1024 on CPU and 8192 on GPU/TPU. The matmul follows the process's
    `jax_default_matmul_precision`, like the training step does. Cached in-process per (platform, device kind,
    dtype, size); `fresh=True` times it again (keeping the better figure in the cache).
    """
    device = device if device is not None else _default_device()
    name = _dtype_name(dtype)
    size = int(size) if size is not None else _default_matmul_size(device.platform)
    if size <= 0 or repeats <= 0:
        raise ValueError(f"size and repeats must be positive, got size={size} repeats={repeats}")
    key = (device.platform, device.device_kind, name, size)
    if key in _MEASURED_CACHE and not fresh:
        return _MEASURED_CACHE[key]

    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(ka, (size, size), jnp.float32).astype(name), device)
    b = jax.device_put(jax.random.normal(kb, (size, size), jnp.float32).astype(name), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    flops = 2.0 * size ** 3 / max(min(times), 1e-9)
    _MEASURED_CACHE[key] = max(flops, _MEASURED_CACHE.get(key, 0.0))
    logging.info("measured %s matmul peak on %s (%s), size %d: %.3g FLOP/s",
                 name, device.device_kind, device.platform, size, flops)
    return flops


def datasheet_peak_flops(device_kind: str, dtype: Any = "bfloat16") -> tuple[float, str] | None:
    """(dense datasheet FLOP/s, source) for a known accelerator kind and dtype, or None."""
    family = _dtype_family(_dtype_name(dtype))
    if family is None:
        return None
    kind = str(device_kind).lower()
    for pattern, label, peaks in _DATASHEET:
        if re.search(pattern, kind):
            if family in peaks:
                return peaks[family], f"datasheet: {label} {family} dense"
            return None
    return None


def device_peak_flops(dtype: Any = "bfloat16", device: Any | None = None) -> tuple[float, str]:
    """Per-device peak FLOP/s for `dtype` matmuls and where the figure comes from.

    Known accelerators (by `device.device_kind`) give their dense datasheet figure, e.g.
    `(989e12, "datasheet: NVIDIA H100 bf16 dense")`. CPUs, unknown kinds and dtypes without a datasheet figure
    (float32 everywhere) give `(measure_matmul_peak(dtype), "measured float32 matmul")`.
    """
    device = device if device is not None else _default_device()
    name = _dtype_name(dtype)
    if device.platform != "cpu":
        found = datasheet_peak_flops(device.device_kind, name)
        if found is not None:
            return found
    return measure_matmul_peak(name, device=device), f"measured {name} matmul"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def peak_store_path() -> str:
    """The file holding the best matmul rate measured so far per machine and dtype (`$LLAMA_JAX_PEAK_STORE`, else
    `~/.cache/llama_jax/matmul_peaks.json`)."""
    return os.environ.get("LLAMA_JAX_PEAK_STORE") or os.path.join(
        os.path.expanduser("~"), ".cache", "llama_jax", "matmul_peaks.json")


def _read_store(path: str) -> dict[str, float]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float)) and v > 0} \
        if isinstance(data, dict) else {}


def _write_store(path: str, data: dict[str, float]) -> None:
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:  # a read-only home must not stop training
        logging.warning("could not record the measured matmul peak in %s: %s", path, e)


class PeakFlops:
    """The MFU denominator of one device, kept honest.

    Datasheet figures (known accelerators) are used as they are. A measured peak (CPUs, float32, unknown kinds)
    is only as good as the moment it was timed: measured while other work shares the machine it comes out low,
    and every MFU computed against it is flattered. So a measured peak is
      * the best of this measurement and the best ever recorded for this machine (CPU model, usable cores,
        platform, device kind, dtype) in `peak_store_path()`, which a better measurement updates;
      * on CPU, divided among the process's local CPU devices: simulated devices share the host's cores, so a
        single-device matmul measures the whole host;
      * re-measured (at most every `remeasure_every_s`) when a step reaches `suspicious_mfu` of it;
      * never below a rate a step was seen to achieve: `check(achieved)` raises it to that, so MFU <= 1 always.
        An achieved rate lives in this process only; the store keeps matmul measurements alone, so one
        mistimed step (a clock jump, a step timed before its work finished) cannot lower every later run's MFU.
    """

    def __init__(self, dtype: Any = "float32", device: Any | None = None, store_path: str | None = None,
                 suspicious_mfu: float = 0.8, remeasure_every_s: float = 60.0,
                 measure: Callable[[], float] | None = None):
        self.device = device if device is not None else _default_device()
        self.dtype = _dtype_name(dtype)
        value, self.source = device_peak_flops(self.dtype, self.device)
        self.measured = self.source.startswith("measured")
        self.suspicious_mfu = float(suspicious_mfu)
        self.remeasure_every_s = float(remeasure_every_s)
        self.store_path = store_path if store_path is not None else peak_store_path()
        self._measure = measure or (lambda: measure_matmul_peak(self.dtype, device=self.device, fresh=True))
        self._last_measure = time.monotonic()
        self._share = 1
        if self.measured and self.device.platform == "cpu":
            self._share = max(1, sum(1 for d in jax.local_devices() if d.platform == "cpu"))
        self._host_peak = float(value)
        if self.measured:
            self._record(self._host_peak)

    @property
    def key(self) -> str:
        # "matmul": records are matmul timings only (earlier versions also stored step rates, some mistimed;
        # their records, keyed without it, are ignored)
        return "|".join(("matmul", _cpu_model(), f"{_usable_cores()} cores", self.device.platform,
                         str(self.device.device_kind), self.dtype))

    @property
    def value(self) -> float:
        """Peak FLOP/s of one device."""
        return self._host_peak / self._share

    def _record(self, measured: float) -> None:
        """Keeps the best of `measured` (a matmul timing), the store's record and the current peak; only a
        matmul timing is ever written to the store."""
        store = _read_store(self.store_path)
        best = max(float(measured), store.get(self.key, 0.0), self._host_peak)
        if best > self._host_peak:
            logging.info("matmul peak: using the best recorded rate %.3g FLOP/s (now measured %.3g)", best,
                         measured)
        self._host_peak = best
        if float(measured) > store.get(self.key, 0.0):
            store[self.key] = float(measured)
            _write_store(self.store_path, store)

    def remeasure(self) -> float:
        """Times the matmul again; keeps the better of the old and new figures; returns the per-device peak."""
        if self.measured:
            self._last_measure = time.monotonic()
            self._record(self._measure())
        return self.value

    def check(self, achieved_flops_per_device: float) -> None:
        """Called with each step's achieved FLOP/s per device: re-measures a measured peak that a step comes
        close to, and raises the peak to any rate actually achieved (a peak below it was timed under load)."""
        achieved = float(achieved_flops_per_device)
        if not self.measured or not math.isfinite(achieved):
            return
        if achieved >= self.suspicious_mfu * self.value and \
                time.monotonic() - self._last_measure >= self.remeasure_every_s:
            self.remeasure()
        if achieved > self.value:
            logging.warning("a step ran at %.3g FLOP/s per device, above the measured matmul peak %.3g: the peak "
                            "was timed while the machine was busy; using the achieved rate as the peak",
                            achieved, self.value)
            self._host_peak = achieved * self._share


# -------------------------------------------------------------------------------------------- throughput


class Throughput:
    """Tokens/s, TFLOP/s per device and MFU from per-step token counts and wall times.

    `flops_per_token` is the model FLOPs of one trained token (forward + backward, e.g. 6N plus attention), so
    MFU = flops_per_token * tokens/s / (n_devices * peak_flops_per_device). `update` returns that step's
    figures; `summary()` the same keys over the last `window` steps (total tokens / total time). Given a
    `PeakFlops` as the peak, each step's achieved rate is checked against it, so MFU never exceeds 1.
    """

    def __init__(self, flops_per_token: float, n_devices: int, peak_flops_per_device: float | PeakFlops,
                 window: int = 20):
        if not flops_per_token > 0:
            raise ValueError(f"flops_per_token must be positive, got {flops_per_token}")
        if int(n_devices) < 1:
            raise ValueError(f"n_devices must be >= 1, got {n_devices}")
        self._peak = peak_flops_per_device if isinstance(peak_flops_per_device, PeakFlops) else None
        if self._peak is None and not peak_flops_per_device > 0:
            raise ValueError(f"peak_flops_per_device must be positive, got {peak_flops_per_device}")
        if int(window) < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.flops_per_token = float(flops_per_token)
        self.n_devices = int(n_devices)
        self._fixed_peak = None if self._peak is not None else float(peak_flops_per_device)
        self._recent: deque[tuple[float, float]] = deque(maxlen=int(window))
        self.total_tokens = 0.0
        self.total_seconds = 0.0

    @property
    def peak_flops_per_device(self) -> float:
        return self._peak.value if self._peak is not None else self._fixed_peak

    def _figures(self, tokens: float, seconds: float, steps: int) -> dict[str, float]:
        tokens_per_s = tokens / seconds
        flops_per_device = self.flops_per_token * tokens_per_s / self.n_devices
        if self._peak is not None:
            self._peak.check(flops_per_device)  # a PeakFlops is never below an achieved rate: MFU <= 1
        return {"tokens_per_s": tokens_per_s, "step_time_s": seconds / steps,
                "mfu": flops_per_device / self.peak_flops_per_device, "tflops_per_device": flops_per_device / 1e12}

    def update(self, step_tokens: int, step_seconds: float) -> dict[str, float]:
        """Records one step of `step_tokens` tokens (global batch) taking `step_seconds`; returns its figures."""
        tokens, seconds = float(step_tokens), float(step_seconds)
        if not seconds > 0:
            raise ValueError(f"step_seconds must be positive, got {step_seconds}")
        if tokens < 0:
            raise ValueError(f"step_tokens must be >= 0, got {step_tokens}")
        self._recent.append((tokens, seconds))
        self.total_tokens += tokens
        self.total_seconds += seconds
        return self._figures(tokens, seconds, 1)

    def summary(self) -> dict[str, float]:
        """The figures over the recent window (NaN values before the first update)."""
        if not self._recent:
            return {k: math.nan for k in ("tokens_per_s", "step_time_s", "mfu", "tflops_per_device")}
        tokens = sum(t for t, _ in self._recent)
        seconds = sum(s for _, s in self._recent)
        return self._figures(tokens, seconds, len(self._recent))


# ------------------------------------------------------------------------------------------------ writers


def _to_float(name: str, value: Any) -> float:
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
        values = {(f"{prefix}/{k}" if prefix else str(k)): _to_float(str(k), v) for k, v in scalars.items()}
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


# ----------------------------------------------------------------------------------------------- console


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
        parts += [_format_scalar(str(k), _to_float(str(k), v)) for k, v in scalars.items()]
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
