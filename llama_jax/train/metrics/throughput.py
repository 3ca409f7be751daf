"""Tokens/s, TFLOP/s per device and MFU from per-step token counts and wall times."""

from __future__ import annotations

import math
from collections import deque

from llama_jax.train.metrics.peak import PeakFlops


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
