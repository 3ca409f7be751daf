"""Per-device peak FLOP/s, the MFU denominator.

`device_peak_flops(dtype, device)` gives a datasheet figure for known accelerators (dense, no sparsity),
otherwise `measure_matmul_peak(dtype)`, a timed square matmul. `PeakFlops` keeps a measured peak honest (best
recorded per machine in `peak_store_path()`, shared among simulated CPU devices, re-measured when a step comes
close, never below an achieved rate). Float32 on accelerators is always measured (the GPU "TF32" figures are
not float32 peaks).
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

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
