"""Joining a multi-process JAX job (`jax.distributed`): what `llama_jax.main --multihost` calls.

One process per host (or per local slice of devices) runs the same program; `initialize()` connects it to the
others through JAX's coordination service, after which `jax.devices()` lists the devices of every process and
jitted steps run as one SPMD program over all of them.

Where the process learns its place:
  * `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`: explicit,
    used by `launch/local.py` and the Kubernetes JobSet manifest (process id = the pod's completion index);
  * otherwise JAX's own cluster detection: SLURM (`srun`), Cloud TPU VMs, Open MPI.
Processes other than 0 log warnings and errors only. On CPU the cross-process collectives use gloo (`jax_cpu_collectives_implementation`), so a multi-process job
runs on one laptop exactly as it would on several GPU hosts.
"""

from __future__ import annotations

import os

import jax
from absl import logging

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def initialize(initialization_timeout_s: int = 300) -> None:
    """Joins the job: explicit environment (see the module docstring) first, then JAX's cluster detection."""
    num_processes, process_id = _env_int(ENV_NUM_PROCESSES), _env_int(ENV_PROCESS_ID)
    if (num_processes is None) != (process_id is None):
        raise ValueError(f"set both {ENV_NUM_PROCESSES} and {ENV_PROCESS_ID} (or neither, to let JAX detect the "
                         "cluster)")
    if num_processes is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(f"{ENV_PROCESS_ID}={process_id} is not in [0, {ENV_NUM_PROCESSES}={num_processes})")
        if not os.environ.get(ENV_ADDRESS):
            raise ValueError(f"{ENV_NUM_PROCESSES} is set but {ENV_ADDRESS} (host:port of process 0) is not")
    platforms = os.environ.get("JAX_PLATFORMS", "") or str(jax.config.jax_platforms or "")
    if platforms.split(",")[0] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=os.environ.get(ENV_ADDRESS) or None,
                               num_processes=num_processes, process_id=process_id,
                               initialization_timeout=initialization_timeout_s)
    if jax.process_index() != 0:  # process 0 tells the story; the others report only warnings and errors
        logging.set_verbosity(logging.WARNING)
