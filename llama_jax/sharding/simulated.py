"""Simulated CPU devices: the environment that makes one process show N XLA:CPU devices.

Imports nothing from JAX: it is applied before JAX starts (the tests, the CPU benchmarks, the local
multi-process launcher).
"""

from __future__ import annotations

import os

# XLA:CPU runs every simulated device's collectives on one thread pool, sized to the machine's cores unless
# PJRT_NPROC says otherwise. A collective holds its thread while it waits for its peers, and independent
# collectives may start together (the pipeline's ppermute beside an all-gather of the head's weights), so with
# more devices than cores the peer a waiting collective needs can be left without a thread: the program aborts
# after 40 s ("Termination timeout ... Expected 8 threads to join the rendezvous"), more often on a loaded
# machine. Four threads per simulated device (a choice) leave every collective a thread; idle ones cost nothing.
THREADS_PER_DEVICE = 4


def cpu_device_env(devices: int, env: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of `env` (default: this process's) with XLA_FLAGS asking for `devices` host devices (any earlier
    device count replaced, other flags kept) and PJRT_NPROC large enough for their collectives (a larger value
    already set is kept)."""
    env = dict(os.environ if env is None else env)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["PJRT_NPROC"] = str(max(int(env.get("PJRT_NPROC") or 0), THREADS_PER_DEVICE * devices))
    return env
