"""Memory / FLOPs plan of an experiment on a mesh, checked against XLA when asked.

    python -m llama_jax.plan --config=experiments/pretrain.py:llama3.1-405b --device_memory=80GiB
    python -m llama_jax.plan --config=experiments/pretrain.py:llama3.1-405b --devices=16384 --device_memory=80GiB
    python -m llama_jax.plan --config=experiments/pretrain.py:tiny --devices=8 --compile --json

Prints per-device bytes for parameters, gradients, optimizer state and activations, FLOPs per step and a time
estimate at --mfu of --peak_flops per device (default: H100 SXM bf16 dense, 989 TFLOP/s), and whether it fits in
--device_memory. --compile compiles the real train step ahead of time on abstract shapes over --devices
simulated CPU devices and prints XLA's memory analysis beside the plan (attention 'auto' is then planned as the
CPU backend, the one compiled). --json prints one JSON object with `planned_bytes_per_device`,
`compiled_bytes_per_device` (with --compile) and `fits` (null without --device_memory). See
`llama_jax/train/planner.py` for what each term counts.
"""

import dataclasses
import json
import math
import time

from absl import flags
from ml_collections import config_flags

from llama_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/NAME.py:ARG).",
                                          lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", 0, "Number of devices of the mesh (0 = the config's plan_devices, the "
                                "device count its mesh is written for; else the devices JAX sees here).")
_DEVICE_MEMORY = flags.DEFINE_string("device_memory", "", "Memory per device, e.g. 80GiB; enables the fits check.")
_COMPILE = flags.DEFINE_bool("compile", False, "Compile the train step on --devices simulated CPU devices and "
                             "print XLA's memory analysis beside the plan.")
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
_STAGE = flags.DEFINE_string("stage", None, "Stage to plan (default: the first).")
_GRAD_ACCUM = flags.DEFINE_integer("grad_accum", 0, "Plan with this many micro-batches per step instead of the "
                                   "stage's grad_accum (0 = the stage's).")
_MFU = flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilization assumed for the time estimate.")
_PEAK = flags.DEFINE_float("peak_flops", 989e12, "Peak dense FLOP/s per device for the time estimate.")
_PLATFORM = flags.DEFINE_enum("platform", "gpu", ["gpu", "tpu", "cpu"], "Platform that resolves attention='auto' "
                              "(cpu with --compile).")
flags.mark_flags_as_required(["config"])
cli.validate(_DEVICES, lambda n: n >= 0, ">= 0 (0 = the devices JAX sees here)")
cli.validate(_GRAD_ACCUM, lambda n: n >= 0, ">= 0 (0 = the stage's)")
cli.validate(_MFU, lambda m: 0 < m <= 1, "in (0, 1]")
cli.validate(_PEAK, lambda f: 0 < f < math.inf, "a positive number of FLOP/s")


def main():
    planned_for = _DEVICES.value or int(_CONFIG.value.get("plan_devices", 0))
    if _COMPILE.value:  # simulated devices must be configured before JAX starts
        if not planned_for:
            raise ValueError("--compile needs --devices=N (the simulated CPU devices to compile for)")
        import jax  # noqa: PLC0415 - imported (config parsing may have), but no backend has started yet

        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", planned_for)
    import jax  # noqa: PLC0415

    from llama_jax.stages import KINDS  # noqa: PLC0415
    from llama_jax.train import planner  # noqa: PLC0415

    devices = planned_for or jax.device_count()
    memory = planner.parse_bytes(_DEVICE_MEMORY.value) if _DEVICE_MEMORY.value else None
    workload = planner.workload_from_config(_CONFIG.value, devices, _STAGE.value, kinds=KINDS)
    if _GRAD_ACCUM.value:
        workload = dataclasses.replace(workload, grad_accum=_GRAD_ACCUM.value)
    platform = "cpu" if _COMPILE.value else _PLATFORM.value
    p = planner.plan(workload, device_memory=memory, peak_flops=_PEAK.value, mfu=_MFU.value, platform=platform)
    out = p.as_dict()
    text = p.report()
    if _COMPILE.value:
        t0 = time.perf_counter()
        compiled = planner.compile_train_step(dataclasses.replace(p.workload, model=workload.model))
        seconds = time.perf_counter() - t0
        got = planner.compiled_bytes_per_device(compiled)
        out.update(compiled_bytes_per_device=got, compile_seconds=seconds,
                   planned_over_compiled=p.total / got)
        text += (f"\n  XLA memory analysis (compiled in {seconds:.1f} s on {devices} simulated CPU devices): "
                 f"{planner.format_bytes(got)} per device; plan / XLA = {p.total / got:.3f}")
    print(json.dumps(out, sort_keys=True) if _JSON.value else text)


if __name__ == "__main__":
    cli.run(main)
