#!/usr/bin/env python3
"""Runs a multi-process JAX job on this machine: N processes x M CPU devices, as a cluster would.

    python launch/local.py --processes=2 --devices_per_process=4 -- \
        --config=experiments/pretrain.py:tiny --workdir=/tmp/llama_tiny_2x4

Everything after `--` goes to `python -m llama_jax.main`, which is started with `--multihost` in each process.
Environment given to process i: JAX_PLATFORMS=cpu, XLA_FLAGS with M simulated host devices,
JAX_COORDINATOR_ADDRESS=127.0.0.1:<a free port>, JAX_NUM_PROCESSES=N, JAX_PROCESS_ID=i (read by
`llama_jax.sharding.distributed.initialize`, which selects gloo for the CPU collectives). Output of every process
is streamed with a `[i] ` prefix. If any process fails, the others are stopped (SIGTERM, then SIGKILL after
`--grace_s`) and the launcher exits with the failing process's status; Ctrl-C / SIGTERM to the launcher is passed
on to every process, which agree on the step to save at and exit with status 75 ("preempted, checkpoint saved":
the launcher then waits for all of them and exits 75 too). No process outlives the launcher: each is started
with a parent-death signal (SIGKILL when the launcher dies, even by SIGKILL). A process that dies leaves the
others unable to save (a checkpoint is a collective of all processes): they are stopped, and a rerun resumes from
the last checkpoint.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from llama_jax.sharding import simulated

EXIT_PREEMPTED = 75  # llama_jax.train.stage_run.EXIT_PREEMPTED: preempted, checkpoint saved
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL when the launcher dies (Linux prctl; elsewhere a no-op)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(index: int, stream, lock: threading.Lock) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\n")
        with lock:
            print(f"[{index}] {line}", flush=True)
    stream.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # each process leads its own group: its children (grain workers) go too
    except ProcessLookupError:
        pass


def process_env(index: int, processes: int, devices_per_process: int, port: int) -> dict[str, str]:
    env = simulated.cpu_device_env(devices_per_process)
    env.update(JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes),
               JAX_PROCESS_ID=str(index), PYTHONUNBUFFERED="1")
    return env


def launch(processes: int, devices_per_process: int, main_args: list[str], grace_s: float = 10.0) -> int:
    """Starts the processes, streams their output, and returns the job's exit status (0 if all succeeded)."""
    port = free_port()
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    stop = {"signal": None}

    def on_signal(signum, frame):  # noqa: ARG001
        stop["signal"] = signum
        for p in procs:
            _signal_group(p, signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(processes):
            cmd = [sys.executable, "-m", "llama_jax.main", "--multihost", *main_args]
            p = subprocess.Popen(cmd, env=process_env(i, processes, devices_per_process, port),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                 preexec_fn=_die_with_parent)
            procs.append(p)
            with lock:
                print(f"[launch] process {i}/{processes}: pid {p.pid}", flush=True)
        for i, p in enumerate(procs):  # threads only once every process is started (preexec_fn and threads)
            t = threading.Thread(target=_pump, args=(i, p.stdout, lock), daemon=True)
            t.start()
            pumps.append(t)
        status = 0
        while True:
            codes = [p.poll() for p in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0, EXIT_PREEMPTED)]
            if failed:
                index, status = failed[0]
                if any(c is None for c in codes):
                    with lock:
                        print(f"[launch] process {index} exited with status {status}: stopping the others",
                              flush=True)
                    _stop_all(procs, grace_s)
                break
            if all(c is not None for c in codes):  # all succeeded, or were preempted after their checkpoint
                status = EXIT_PREEMPTED if EXIT_PREEMPTED in codes else 0
                break
            time.sleep(0.1)
        if stop["signal"] is not None:
            _stop_all(procs, grace_s)
    finally:
        _stop_all(procs, grace_s)
        for t in pumps:
            t.join(timeout=5)
        for s, h in old.items():
            signal.signal(s, h)
    if status < 0:  # killed by a signal: report it the way a shell does
        status = 128 - status
    with lock:
        outcome = {0: "succeeded", EXIT_PREEMPTED: f"preempted, checkpoint saved (status {status})"}
        print(f"[launch] job {outcome.get(status, f'failed (status {status})')}", flush=True)
    return status


def _stop_all(procs: list[subprocess.Popen], grace_s: float) -> None:
    running = [p for p in procs if p.poll() is None]
    for p in running:
        _signal_group(p, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for p in running:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:  # the process and anything it started in its group
        _signal_group(p, signal.SIGKILL)
        p.wait()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, main_args = argv[:split], argv[split + 1:]
    else:
        own, main_args = argv, []
    parser = argparse.ArgumentParser(prog="launch/local.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, required=True, help="number of processes (N)")
    parser.add_argument("--devices_per_process", type=int, required=True, help="CPU devices per process (M)")
    parser.add_argument("--grace_s", type=float, default=10.0,
                        help="seconds between SIGTERM and SIGKILL when stopping processes")
    args = parser.parse_args(own)
    if args.processes < 1:
        parser.error(f"--processes={args.processes} must be >= 1")
    if args.devices_per_process < 1:
        parser.error(f"--devices_per_process={args.devices_per_process} must be >= 1")
    if not main_args:
        parser.error("no llama_jax.main flags after `--` (e.g. -- --config=experiments/pretrain.py:tiny "
                     "--workdir=DIR)")
    return launch(args.processes, args.devices_per_process, main_args, args.grace_s)


if __name__ == "__main__":
    sys.exit(main())
