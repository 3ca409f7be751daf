"""Peak FLOP/s lookup, MFU arithmetic, the JSONL/TensorBoard writer and the console progress line."""

import glob
import io
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.train import metrics
from llama_jax.train.metrics import peak as peak_lib


class FakeDevice:
    def __init__(self, device_kind, platform="gpu"):
        self.device_kind = device_kind
        self.platform = platform


# ------------------------------------------------------------------------------------------- peak FLOP/s


@pytest.mark.parametrize("kind, platform, dtype, peak, label", [
    ("NVIDIA H100 80GB HBM3", "gpu", "bfloat16", 989e12, "NVIDIA H100 bf16"),
    ("NVIDIA H100 PCIe", "gpu", "bfloat16", 756e12, "NVIDIA H100 PCIe bf16"),
    ("NVIDIA H100 80GB HBM3", "gpu", jnp.float8_e4m3fn, 1979e12, "NVIDIA H100 fp8"),
    ("NVIDIA H200", "gpu", "bfloat16", 989e12, "NVIDIA H200 bf16"),
    ("NVIDIA A100-SXM4-80GB", "gpu", jnp.bfloat16, 312e12, "NVIDIA A100 bf16"),
    ("NVIDIA A100-PCIE-40GB", "gpu", "float16", 312e12, "NVIDIA A100 fp16"),
    ("NVIDIA L4", "gpu", "bfloat16", 121e12, "NVIDIA L4 bf16"),
    ("TPU v4", "tpu", "bfloat16", 275e12, "TPU v4 bf16"),
    ("TPU v5 lite", "tpu", "bfloat16", 197e12, "TPU v5e bf16"),
    ("TPU v5", "tpu", "bfloat16", 459e12, "TPU v5p bf16"),
    ("TPU v5p", "tpu", "bfloat16", 459e12, "TPU v5p bf16"),
    ("TPU v6 lite", "tpu", "bfloat16", 918e12, "TPU v6e bf16"),
    ("Trillium", "tpu", "bfloat16", 918e12, "TPU v6e bf16"),
])
def test_datasheet_lookup(kind, platform, dtype, peak, label):
    flops, source = peak_lib.device_peak_flops(dtype, device=FakeDevice(kind, platform))
    assert flops == peak
    assert source == f"datasheet: {label} dense"


@pytest.mark.parametrize("kind, platform, dtype", [
    ("NVIDIA H100 80GB HBM3", "gpu", "float32"),  # TF32 is not a float32 peak
    ("TPU v5 lite", "tpu", "float32"),
    ("NVIDIA L40S", "gpu", "bfloat16"),  # unknown kind; must not match L4
    ("TPU v4 lite", "tpu", "bfloat16"),  # v4i, not v4
    ("TPU v5 lite", "tpu", "float16"),  # no datasheet figure for this dtype
])
def test_no_datasheet_figure_falls_back_to_measurement(monkeypatch, kind, platform, dtype):
    calls = []

    def fake_measure(dtype, size=None, repeats=5, device=None):
        calls.append((dtype, device.device_kind))
        return 1.5e12

    monkeypatch.setattr(peak_lib, "measure_matmul_peak", fake_measure)
    flops, source = peak_lib.device_peak_flops(dtype, device=FakeDevice(kind, platform))
    assert flops == 1.5e12
    assert source == f"measured {np.dtype(dtype).name} matmul"
    assert calls == [(np.dtype(dtype).name, kind)]


def test_cpu_peak_is_measured_and_cached():
    flops, source = peak_lib.device_peak_flops("float32")
    assert jax.local_devices()[0].platform == "cpu"
    assert source == "measured float32 matmul"
    assert math.isfinite(flops) and flops > 0
    # cached: the second call returns the very same figure without re-timing
    assert peak_lib.measure_matmul_peak("float32") == flops
    assert peak_lib.device_peak_flops(jnp.float32)[0] == flops
    # explicit size: a separate (small) measurement
    assert peak_lib.measure_matmul_peak("float32", size=128, repeats=2) > 0


def _fake_peak(tmp_path, rates, **kw):
    """A PeakFlops on the (simulated, 8-device) CPU whose successive measurements return `rates`."""
    rates = list(rates)
    calls = []

    def measure():
        calls.append(1)
        return rates.pop(0)

    first = rates.pop(0)
    kw.setdefault("store_path", str(tmp_path / "peaks.json"))
    orig = peak_lib.device_peak_flops
    peak_lib.device_peak_flops = lambda dtype, device=None: (first, "measured float32 matmul")
    try:
        return peak_lib.PeakFlops("float32", measure=measure, **kw), calls
    finally:
        peak_lib.device_peak_flops = orig


def test_peak_is_shared_by_simulated_cpu_devices_and_keeps_the_best_recorded(tmp_path):
    n_local = len(jax.local_devices())
    assert n_local == 8
    peak, _ = _fake_peak(tmp_path, [80e9])
    assert peak.value == pytest.approx(80e9 / 8)  # 8 simulated devices share the host's cores
    # a later run timed on a busy machine measures less: the best recorded figure for this machine wins
    busy, _ = _fake_peak(tmp_path, [20e9])
    assert busy.value == pytest.approx(80e9 / 8)
    assert json.loads((tmp_path / "peaks.json").read_text()) == {peak.key: 80e9}
    # a better measurement replaces the record
    better, _ = _fake_peak(tmp_path, [100e9])
    assert better.value == pytest.approx(100e9 / 8)
    assert json.loads((tmp_path / "peaks.json").read_text())[peak.key] == 100e9
    assert "cores" in peak.key and "float32" in peak.key


def test_peak_is_remeasured_when_a_step_comes_close_and_never_below_an_achieved_rate(tmp_path):
    # first timed while busy (8 GFLOP/s host = 1 per device); the re-measurement sees the idle 16 GFLOP/s
    peak, calls = _fake_peak(tmp_path, [8e9, 16e9, 16e9], remeasure_every_s=0.0)
    tp = metrics.Throughput(flops_per_token=1e6, n_devices=8, peak_flops_per_device=peak)
    m = tp.update(step_tokens=1000, step_seconds=1.0)  # 1e9 FLOP/s over 8 devices: 12.5% of 1e9 -> fine
    assert calls == [] and m["mfu"] == pytest.approx(0.125)
    m = tp.update(step_tokens=7000, step_seconds=1.0)  # 0.875e9 per device: suspicious -> re-measured at 2e9
    assert calls == [1] and peak.value == pytest.approx(2e9)
    assert m["mfu"] == pytest.approx(0.4375)
    m = tp.update(step_tokens=40000, step_seconds=1.0)  # 5e9 per device: above any measurement
    assert calls == [1, 1]
    assert peak.value == pytest.approx(5e9) and m["mfu"] == pytest.approx(1.0)
    assert tp.summary()["mfu"] <= 1.0
    # the achieved rate is this process's only: the store keeps the best matmul measurement
    assert json.loads((tmp_path / "peaks.json").read_text())[peak.key] == pytest.approx(16e9)
    later, _ = _fake_peak(tmp_path, [12e9])
    assert later.value == pytest.approx(2e9)


def test_peak_remeasurement_is_rate_limited_and_datasheet_peaks_are_fixed(tmp_path):
    peak, calls = _fake_peak(tmp_path, [8e9, 8e9], remeasure_every_s=3600.0)
    peak.check(0.99e9)
    assert calls == []  # measured moments ago
    gpu = peak_lib.PeakFlops("bfloat16", device=FakeDevice("NVIDIA H100 80GB HBM3"), store_path=str(tmp_path / "g"))
    gpu.check(2000e12)
    assert gpu.value == 989e12 and not gpu.measured
    assert not (tmp_path / "g").exists()


def test_unwritable_peak_store_does_not_stop_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    peak, _ = _fake_peak(tmp_path, [8e9], store_path=str(blocker / "sub" / "peaks.json"))
    assert peak.value == pytest.approx(1e9)


# -------------------------------------------------------------------------------------------- throughput


def test_throughput_mfu_arithmetic():
    # 1B-param model: 6e9 FLOPs per token; 8 devices of 100 TFLOP/s peak.
    tp = metrics.Throughput(flops_per_token=6e9, n_devices=8, peak_flops_per_device=100e12)
    m = tp.update(step_tokens=262_144, step_seconds=4.0)
    # 65,536 tok/s * 6e9 = 3.93216e14 FLOP/s over 8 devices = 4.9152e13 per device -> 49.152% MFU
    assert m["tokens_per_s"] == pytest.approx(65_536.0)
    assert m["step_time_s"] == pytest.approx(4.0)
    assert m["tflops_per_device"] == pytest.approx(49.152)
    assert m["mfu"] == pytest.approx(0.49152)

    m2 = tp.update(step_tokens=262_144, step_seconds=2.0)
    assert m2["mfu"] == pytest.approx(0.98304)
    s = tp.summary()  # 524,288 tokens in 6 s
    assert s["tokens_per_s"] == pytest.approx(524_288 / 6)
    assert s["step_time_s"] == pytest.approx(3.0)
    assert s["mfu"] == pytest.approx(524_288 / 6 * 6e9 / 8 / 100e12)


def test_throughput_window_and_validation():
    tp = metrics.Throughput(1.0, 1, 1.0, window=2)
    assert all(math.isnan(v) for v in tp.summary().values())
    for seconds in (10.0, 1.0, 1.0):  # the first (slow, e.g. compile) step leaves the window
        tp.update(100, seconds)
    assert tp.summary()["tokens_per_s"] == pytest.approx(100.0)
    assert tp.total_tokens == 300 and tp.total_seconds == pytest.approx(12.0)
    with pytest.raises(ValueError, match="step_seconds"):
        tp.update(100, 0.0)
    with pytest.raises(ValueError, match="n_devices"):
        metrics.Throughput(1.0, 0, 1.0)
    with pytest.raises(ValueError, match="peak_flops_per_device"):
        metrics.Throughput(1.0, 1, 0.0)


# ------------------------------------------------------------------------------------------------ writer


def _tf_records(path):
    with open(path, "rb") as f:
        while header := f.read(12):
            (length,) = struct.unpack("<Q", header[:8])
            data = f.read(length)
            f.read(4)
            yield data


def _event_values(logdir):
    from tensorboardX.proto import event_pb2
    files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
    assert files, f"no event file in {logdir}"
    out = []
    for path in files:
        for data in _tf_records(path):
            event = event_pb2.Event.FromString(data)
            for v in event.summary.value:
                out.append((event.step, v.tag, v.simple_value))
    return out


def test_writer_jsonl_round_trip_and_append(tmp_path):
    workdir = str(tmp_path / "run")
    with metrics.MetricWriter(workdir, process_index=0) as w:
        w.write_scalars(1, {"loss": jnp.float32(2.5), "lr": np.float64(1e-3), "count": np.int32(7)},
                        prefix="train")
        w.write_scalars(2, {"loss": float("nan"), "gnorm": jnp.array(np.inf)}, prefix="train")
        w.write_text(2, "sample", "hello world")
    text = open(os.path.join(workdir, "metrics.jsonl")).read()
    assert "NaN" not in text and "Infinity" not in text
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))

    recs = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 2]
    assert recs[0]["train/loss"] == 2.5 and recs[0]["train/lr"] == 1e-3 and recs[0]["train/count"] == 7.0
    assert all(type(recs[0][k]) is float for k in ("train/loss", "train/lr", "train/count"))
    assert recs[1]["train/loss"] is None and recs[1]["train/gnorm"] is None
    assert recs[2]["sample"] == "hello world"
    assert list(recs[0])[0] == "step" and list(recs[0])[-1] == "time"
    assert all(isinstance(r["time"], float) for r in recs)

    # a resumed run appends
    with metrics.MetricWriter(workdir, process_index=0) as w:
        w.write_scalars(3, {"loss": 1.25}, prefix="train")
    recs = metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in recs] == [1, 2, 2, 3] and recs[3]["train/loss"] == 1.25

    # TensorBoard got the scalars too, including the non-finite ones
    tb = _event_values(os.path.join(workdir, "tensorboard"))
    scalars = {(step, tag): v for step, tag, v in tb if tag.startswith("train/")}
    assert scalars[(1, "train/loss")] == 2.5
    assert math.isnan(scalars[(2, "train/loss")]) and math.isinf(scalars[(2, "train/gnorm")])
    assert scalars[(3, "train/loss")] == 1.25
    assert any(tag.startswith("sample") for _, tag, _ in tb)


def test_writer_only_process_zero_writes(tmp_path):
    with metrics.MetricWriter(str(tmp_path / "w1"), process_index=1) as w:
        w.write_scalars(1, {"loss": 1.0})
        w.write_text(1, "t", "x")
    assert not (tmp_path / "w1").exists()


def test_writer_rejects_non_scalar(tmp_path):
    with metrics.MetricWriter(str(tmp_path), tensorboard=False, process_index=0) as w:
        with pytest.raises(TypeError, match="'acts'"):
            w.write_scalars(1, {"acts": np.ones(3)})


def test_truncated_last_line(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    with caplog.at_level("WARNING"):
        recs = metrics.read_jsonl(str(path))
    assert [r["step"] for r in recs] == [1, 2]
    assert "truncated" in caplog.text

    # a bad line that is not the last one is an error
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        metrics.read_jsonl(str(bad))

    # reopening after such a kill drops only the fragment, then appends
    with metrics.MetricWriter(str(tmp_path), tensorboard=False, process_index=0) as w:
        w.write_scalars(3, {"loss": 1.0})
    recs = metrics.read_jsonl(str(path))
    assert [r["step"] for r in recs] == [1, 2, 3] and recs[2]["loss"] == 1.0


# ----------------------------------------------------------------------------------------------- console


def test_format_duration():
    assert metrics.format_duration(0) == "0s"
    assert metrics.format_duration(45.2) == "45s"
    assert metrics.format_duration(62) == "1m02s"
    assert metrics.format_duration(145) == "2m25s"
    assert metrics.format_duration(3723) == "1h02m03s"
    assert metrics.format_duration(93784) == "1d02h03m"
    assert metrics.format_duration(float("nan")) == "?"
    assert metrics.format_duration(-1) == "?"


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_progress_line_eta_and_rate_limit():
    clock, out = FakeClock(), io.StringIO()
    p = metrics.Progress(total_steps=400, start_step=100, desc="pretrain", every_s=10.0, stream=out, clock=clock)
    scalars = {"loss": 4.2131, "lr": 1e-3, "tokens_per_s": 5100.0, "mfu": 0.123}

    clock.t += 2.0
    assert p.update(101, scalars)  # the first update prints
    line = out.getvalue().splitlines()[-1]
    assert line.startswith("[pretrain] step 101/400 (25.2%) loss 4.213 lr 1.0e-03 tok/s 5.1k mfu 12.3% |")
    # rate from this process's steps only (1 step in 2 s), not from step 0
    assert line.endswith("elapsed 2s eta 9m58s")

    for step in range(102, 111):  # 1 s per step: nothing printed until 10 s after the last print
        clock.t += 1.0
        assert not p.update(step, scalars)
    assert len(out.getvalue().splitlines()) == 1
    clock.t += 1.0
    assert p.update(111, scalars)  # 10 s since the last print
    line = out.getvalue().splitlines()[-1]
    # timed from the first update: 10 steps in 10 s -> 289 remaining steps * 1 s
    assert "step 111/400 (27.8%)" in line and line.endswith("elapsed 12s eta 4m49s")

    clock.t += 1.0
    assert p.update(400, {"loss": 3.0})  # the last step always prints
    assert out.getvalue().splitlines()[-1].endswith("(100.0%) loss 3 | elapsed 13s eta 0s")
    assert len(out.getvalue().splitlines()) == 3


def test_progress_without_desc_or_scalars():
    clock, out = FakeClock(), io.StringIO()
    p = metrics.Progress(total_steps=10, every_s=0.0, stream=out, clock=clock)
    clock.t += 5.0
    p.update(5)
    assert out.getvalue() == "step 5/10 (50.0%) | elapsed 5s eta 5s\n"
