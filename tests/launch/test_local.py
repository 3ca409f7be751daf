"""launch/local.py with real processes and default flags (the data's shard count is fixed by the batch, not
by the process count): 2 processes x 4 CPU devices and 4 x 2 (gloo collectives) train exactly like 1 process x 8
devices; killing one process stops the whole job, and a rerun through the launcher on a different process count
(1 x 8) resumes from the 2-process checkpoint and reaches the uninterrupted run's parameters; a SIGTERM that
reaches one process of four stops all four at the same saved step with the "preempted" status, and the rerun
ends at the uninterrupted run's parameters; SIGKILL of the launcher takes its processes with it.

One 2-process run serves the first claims (it is killed after its second checkpoint), so the module starts two
multi-process jobs and two reruns besides the in-process reference."""

import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

from llama_jax.stages import KINDS
from llama_jax.train import driver, stage_run
from llama_jax.train import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 8
ARG = f"tiny,steps={STEPS},batch=32,seq_len=32,warmup=2,layers=2"  # 4 data shards by default (8 rows each)
TIMEOUT_S = 240  # a bound on each multi-process run (compilation included), never a performance check


def _overrides(embedded_data_cache: str) -> dict:
    return {"data.cache_dir": embedded_data_cache, "checkpoint.every_steps": 2,
            "checkpoint.async_save": False, "eval.batches": 0, "eval.every_steps": 0,
            "sample.max_new_tokens": 0, "log_every_steps": 1}


def _config(embedded_data_cache: str, **extra):
    import importlib.util
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "experiments/pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(ARG)
    for key, value in {**_overrides(embedded_data_cache), **extra}.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def _launch_cmd(workdir, embedded_data_cache, processes=2, devices=4, **extra) -> list[str]:
    flags = [f"--config.{k}={v}" for k, v in {**_overrides(embedded_data_cache), **extra}.items()]
    return [sys.executable, str(REPO / "launch/local.py"), f"--processes={processes}",
            f"--devices_per_process={devices}", "--grace_s=5", "--",
            f"--config={REPO / 'experiments/pretrain.py'}:{ARG}", f"--workdir={workdir}", *flags]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def _losses(workdir) -> dict[int, float]:
    return {r["step"]: r["pretrain/train/loss"] for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
            if "pretrain/train/loss" in r}


def _params(workdir):
    from llama_jax.interop import checkpoints  # noqa: PLC0415
    return jax.device_get(checkpoints.load(str(workdir))[1])


@pytest.fixture(scope="module")
def reference(embedded_data_cache, tmp_path_factory):
    """The uninterrupted 1-process, 8-device run (in this process: conftest's 8 CPU devices)."""
    workdir = tmp_path_factory.mktemp("ref_1x8")
    driver.run_experiment(_config(embedded_data_cache), str(workdir), KINDS)
    return _losses(workdir), _params(workdir)


PEAK_LR = 3e-3  # experiments/pretrain.py:tiny's learning rate (ARG leaves it)


def _assert_params_close(actual, expected):
    """Equal up to the summation order of the all-reduce: gloo across processes vs XLA within one. Adam turns a
    near-zero gradient into an update of about the learning rate whatever its size (u = g / (|g| + eps)), so
    the entries whose gradient is at round-off level may differ by up to 2 x lr per step, bounded by
    2 x STEPS x PEAK_LR; at most one entry in 10,000 may differ by more than 1e-6."""
    expected = dict(jax.tree_util.tree_flatten_with_path(expected)[0])
    for path, a in jax.tree_util.tree_flatten_with_path(actual)[0]:
        e = expected[path]
        np.testing.assert_allclose(a, e, rtol=0, atol=2 * STEPS * PEAK_LR, err_msg=jax.tree_util.keystr(path))
        assert np.mean(np.abs(a - e) > 1e-6) < 1e-4, jax.tree_util.keystr(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit status may wait for a reaper that this sandbox lacks)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _stop(proc: subprocess.Popen, pids: dict) -> None:
    """Leaves nothing running if the test fails midway: the launcher stops its processes on SIGTERM."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid in pids.values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.fixture(scope="module")
def killed_run(embedded_data_cache, tmp_path_factory):
    """A 2 x 4 run from scratch, process 1 SIGKILLed once checkpoint 2 is written: (workdir, console, pids,
    launcher status, last saved step)."""
    workdir = tmp_path_factory.mktemp("run_2x4") / "run"
    ckpts = workdir / "stages" / "pretrain" / "checkpoints"
    proc = subprocess.Popen(_launch_cmd(workdir, embedded_data_cache, **{"checkpoint.every_steps": 1}), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    pids: dict[int, int] = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not (ckpts / "2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        for line in list(out):
            m = re.match(r"\[launch\] process (\d+)/2: pid (\d+)", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        assert proc.poll() is None and len(pids) == 2, "the run ended before it was killed:\n" + "".join(out)[-3000:]
        os.kill(pids[1], signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        _stop(proc, pids)
    reader.join(timeout=10)
    saved = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    return workdir, "".join(out), pids, proc.returncode, saved


def test_two_processes_match_one_process_and_a_killed_process_stops_the_job(killed_run, reference):
    workdir, text, pids, status, saved = killed_run
    assert status != 0, text[-3000:]
    assert "[launch] process 1 exited with status -9: stopping the others" in text, text[-3000:]
    assert not _alive(pids[0]) and not _alive(pids[1])
    assert 2 <= saved < STEPS
    # One story on the console: process 0 logs and shows progress, process 1 only warnings and errors.
    lines = text.splitlines()
    assert any(line.startswith("[0] [pretrain] step") for line in lines)
    assert not any(line.startswith("[1] ") and "[pretrain] step" in line for line in lines)
    # Only process 0 writes the run's files: at most one metrics record per step, and every step up to the
    # checkpoint has its loss, equal to the 1-process 8-device run's (gloo vs XLA summation order: 1e-5).
    records = [r for r in metrics_lib.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "pretrain/train/loss" in r]
    assert len(records) == len({r["step"] for r in records}), records
    losses = _losses(workdir)
    assert set(range(1, saved)) <= set(losses), sorted(losses)
    ref_losses, _ = reference
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)],
                               rtol=1e-5)


def test_a_rerun_on_one_process_resumes_the_two_process_checkpoint(killed_run, reference, embedded_data_cache):
    """The launcher's success path on another process count (1 x 8): the state saved by 2 processes is
    resharded, both logical data shards continue, and the run ends with the uninterrupted run's parameters."""
    workdir, _, _, _, saved = killed_run
    proc = subprocess.run(_launch_cmd(workdir, embedded_data_cache, processes=1, devices=8), env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:]
    lines = proc.stdout.splitlines()
    assert lines[-1] == "[launch] job succeeded"
    assert any(line.startswith("[0] ") and "stage 'pretrain' finished" in line for line in lines)
    assert any(f"resumed from its checkpoint at step {saved}" in line for line in lines), proc.stdout[-3000:]
    ref_losses, ref_params = reference
    losses = _losses(workdir)  # the rerun's records of steps after the checkpoint come last
    assert set(range(saved + 1, STEPS + 1)) <= set(losses) and losses[1] > losses[STEPS]
    np.testing.assert_allclose([losses[s] for s in range(saved + 1, STEPS + 1)],
                               [ref_losses[s] for s in range(saved + 1, STEPS + 1)], rtol=1e-5)
    _assert_params_close(_params(workdir), ref_params)


def _start(cmd) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    return proc, out, reader


def _pids(out: list[str], processes: int, proc, deadline: float) -> dict[int, int]:
    pids: dict[int, int] = {}
    while len(pids) < processes and proc.poll() is None and time.monotonic() < deadline:
        for line in list(out):
            m = re.match(r"\[launch\] process (\d+)/\d+: pid (\d+)", line)
            if m:
                pids[int(m.group(1))] = int(m.group(2))
        time.sleep(0.02)
    return pids


def test_sigterm_to_one_of_four_processes_stops_all_at_one_saved_step(embedded_data_cache, tmp_path, reference):
    """The preemption flag is agreed across processes: all four save the same step and exit 75."""
    workdir = tmp_path / "run"
    ckpts = workdir / "stages" / "pretrain" / "checkpoints"
    cmd = _launch_cmd(workdir, embedded_data_cache, processes=4, devices=2, **{"checkpoint.every_steps": 100})
    proc, out, reader = _start(cmd)
    pids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + TIMEOUT_S
        pids = _pids(out, 4, proc, deadline)
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and max(_losses(workdir), default=0) >= 2) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None and len(pids) == 4, "the run ended early:\n" + "".join(out)[-3000:]
        os.kill(pids[2], signal.SIGTERM)  # one host first
        proc.wait(timeout=TIMEOUT_S)
    finally:
        _stop(proc, pids)
    reader.join(timeout=10)
    text = "".join(out)
    assert proc.returncode == 75, text[-3000:]
    assert "[launch] job preempted, checkpoint saved (status 75)" in text
    saved = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert saved[0] == 0 and 2 <= saved[-1] < STEPS and len(saved) == 2, saved  # one step, saved by all
    said = {int(m.group(1)) for m in re.finditer(r"\[(\d)\] .*SIGTERM: checkpoint saved at step (\d+)", text)}
    assert said == {0, 1, 2, 3}, text[-3000:]  # every process stopped at the agreed step
    rerun = subprocess.run(_launch_cmd(workdir, embedded_data_cache, processes=4, devices=2,
                                       **{"checkpoint.every_steps": 100}),
                           env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert rerun.returncode == 0, rerun.stdout[-4000:]
    ref_losses, ref_params = reference
    losses = _losses(workdir)
    assert sorted(losses) == list(range(1, STEPS + 1))  # each step once: the resumed steps are not duplicated
    np.testing.assert_allclose([losses[s] for s in range(1, STEPS + 1)], [ref_losses[s] for s in range(1, STEPS + 1)],
                               rtol=1e-5)
    _assert_params_close(_params(workdir), ref_params)


def test_the_processes_die_with_the_launcher(embedded_data_cache, tmp_path):
    cmd = _launch_cmd(tmp_path / "run", embedded_data_cache)
    proc, out, reader = _start(cmd)
    pids = _pids(out, 2, proc, time.monotonic() + TIMEOUT_S)
    try:
        assert len(pids) == 2 and all(_alive(p) for p in pids.values()), "".join(out)[-3000:]
        proc.kill()  # SIGKILL: the launcher cannot stop anything itself
        proc.wait()
        deadline = time.monotonic() + 30
        while any(_running(p) for p in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_running(p) for p in pids.values())
    finally:
        _stop(proc, pids)
    reader.join(timeout=10)
