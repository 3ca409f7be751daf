"""Training metrics: device peak FLOP/s, throughput and MFU, metric writers and a console progress line.

  * `peak`: `device_peak_flops(dtype, device)`, the per-device dense peak used as the MFU denominator (a
    datasheet figure for known accelerators, otherwise `measure_matmul_peak(dtype)`), and `PeakFlops`, which keeps
    a measured peak honest (the best recorded per machine in `peak_store_path()`).
  * `throughput`: `Throughput` turns (tokens, seconds) per step into tokens/s, TFLOP/s per device and MFU, per
    step and smoothed over a window of recent steps.
  * `writer`: `MetricWriter` writes scalars and text to TensorBoard and to `<workdir>/metrics.jsonl`;
    `read_jsonl` reads that file back.
  * `progress`: `Progress` prints a rate-limited one-line status with elapsed time and ETA.

None of this runs inside a jitted step; the loop calls it with host values.
"""

from llama_jax.train.metrics.peak import (PeakFlops, datasheet_peak_flops, device_peak_flops, measure_matmul_peak,
                                          peak_store_path)
from llama_jax.train.metrics.progress import Progress, format_duration
from llama_jax.train.metrics.throughput import Throughput
from llama_jax.train.metrics.writer import MetricWriter, read_jsonl

__all__ = ["MetricWriter", "PeakFlops", "Progress", "Throughput", "datasheet_peak_flops", "device_peak_flops",
           "format_duration", "measure_matmul_peak", "peak_store_path", "read_jsonl"]
