"""The fit check a run makes before it builds data or initializes parameters: will each stage's step fit in the
memory of the devices it was given? (`planner.plan` against what the devices have.)

Device memory: what the accelerator reports (`memory_stats()["bytes_limit"]`); on CPU, where the simulated
devices share the host, the host's memory (the smaller of physical memory and the cgroup limit) divided by the
local devices. A stage that does not fit stops the run with one line: planned bytes per device, what the
devices have, the biggest term and what to change (`--config.skip_fit_check=true` runs it anyway).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
from absl import logging

from llama_jax.train import planner


def host_memory_bytes() -> int | None:
    """Physical memory of this host, bounded by the cgroup's limit when one is set; None if unknown."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def device_memory_bytes() -> tuple[int | None, str]:
    """(bytes per device, where the number comes from)."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"{device.device_kind} memory"
    host = host_memory_bytes()
    if host is None:
        return None, "unknown"
    n = jax.local_device_count()
    return host // n, f"host memory / {n} local device{'s' if n > 1 else ''}"


_PLANNED: dict[str, int] = {}  # planned bytes per device by workload (stages and runs repeat their shapes)


def check(c: Any, stages: list, kinds: Mapping[str, Any]) -> None:
    """Raises a one-line ValueError for the first training stage whose planned step does not fit."""
    memory, source = device_memory_bytes()
    if memory is None:
        return
    for st in stages:
        if st.total_steps == 0:
            continue
        try:
            w = planner.stage_workload(c, st, jax.device_count(), frozen_models=kinds[st.kind].frozen_models)
            planner.local_workload(w, jax.default_backend())  # its batch splits over this mesh
        except ValueError as e:  # a batch or mesh the stage cannot use: the stage says so itself when it starts
            logging.warning("stage %r: memory not planned (%s)", st.name, e)
            continue
        key = f"{dataclasses.replace(w, stage='', optim=None)!r} {jax.default_backend()}"  # the memory's inputs
        if key in _PLANNED and _PLANNED[key] <= memory:
            continue
        p = planner.plan(w, device_memory=memory, platform=jax.default_backend())
        _PLANNED[key] = p.total
        if not p.fits:
            raise ValueError(
                f"stage {st.name!r} does not fit: planned {planner.format_bytes(p.total)} per device > "
                f"{planner.format_bytes(memory)} ({source}); the biggest term is {p.biggest} "
                f"({planner.format_bytes(getattr(p, p.biggest))}). To change: {p.advice()}; or run anyway with "
                "--config.skip_fit_check=true")
