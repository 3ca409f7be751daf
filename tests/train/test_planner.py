"""The memory planner against XLA's own memory analysis, the 405B step compiled ahead of time, and the
`python -m llama_jax.plan` command line."""

import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from llama_jax.model import attention
from llama_jax.sharding import jax_compat
from llama_jax.stages import KINDS
from llama_jax.train import planner

REPO = pathlib.Path(__file__).resolve().parents[2]


def _config(arg):
    spec = importlib.util.spec_from_file_location("pretrain", REPO / "experiments/pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(arg)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("XLA_FLAGS", None)  # the command sets its own simulated devices
    return env


def test_parse_and_format_bytes():
    assert planner.parse_bytes("80GiB") == 80 * 2 ** 30
    assert planner.parse_bytes("96 GB") == 96 * 10 ** 9
    assert planner.parse_bytes("1.5e3") == 1500
    with pytest.raises(ValueError, match="cannot read a memory size from '80 parsecs'"):
        planner.parse_bytes("80 parsecs")
    assert planner.format_bytes(3 * 2 ** 30) == "3.00 GiB"


def test_param_terms_follow_the_sharding_rules():
    """Hand count: the 1B model (tied embeddings) has 1,235,814,400 float32 parameters; fsdp over 8 splits every
    tensor with an `embed` axis (all but the norm gains, 2·16·2048 + 2048 values) eight ways."""
    w = planner.workload_from_config(_config("llama3.2-1b"), 8, kinds=KINDS)
    assert w.model.param_count() == 1_235_814_400 and dict(w.mesh)["fsdp"] == 8
    norms = 2 * 16 * 2048 + 2048
    assert planner.param_bytes_per_device(w) == 4 * ((1_235_814_400 - norms) // 8 + norms)
    dp = dataclasses.replace(w, rules="dp", mesh={"data": 8, "fsdp": 1, "context": 1, "tensor": 1})
    assert planner.param_bytes_per_device(dp) == 4 * 1_235_814_400
    assert planner.gathered_bytes_per_device(dp) == 0


def test_1b_plan_is_within_15_percent_of_xla():
    """Llama 3.2 1B as in experiments/pretrain.py:llama3.2-1b (bf16, FSDP over 8, save_dots_no_batch, chunked
    loss), at 8 x 1024 tokens per step so that it compiles in seconds; the real step, compiled."""
    c = _config("llama3.2-1b")
    w = dataclasses.replace(planner.workload_from_config(c, jax.device_count(), kinds=KINDS), global_batch=8, seq_len=1024,
                            loss_chunk=512, grad_accum=1)
    p = planner.plan(w, platform="cpu")
    compiled = planner.compiled_bytes_per_device(planner.compile_train_step(p.workload))
    assert 0.85 <= p.total / compiled <= 1.15, (p.report(), compiled)


def test_405b_pipelined_train_step_compiles_with_depth_independent_structure():
    """The full 126-layer 405B step, pipelined as configured (interleaved 1F1B, 4 virtual stages, lighter first and
    last stages) at a scaled-down mesh (pipe 2 x TP 4 on 8 simulated devices, abstract shapes) compiles; each
    chunk's layers run as one scanned loop body, so the program is the same size at 6 layers and at 126."""
    c = _config("llama3.1-405b")
    assert dict(c.mesh)["pipe"] == 16 and c.pipeline.virtual == 4 and c.pipeline.lighter_ends == 1
    c.mesh.update(pipe=2, tensor=4)
    c.pipeline.update(microbatches=2)
    w = dataclasses.replace(planner.workload_from_config(c, jax.device_count(), kinds=KINDS), global_batch=8,
                            seq_len=256, loss_chunk=256)
    assert w.model.n_layers == 126 and w.pipeline.stages == 2
    compiled = planner.compile_train_step(w)
    hlo = compiled.as_text()
    assert re.search(r'known_trip_count[^}]*"n":"16"', hlo), "(126 + 2) / (2 x 4) = 16 slots per chunk, one loop"
    assert compiled.memory_analysis().argument_size_in_bytes > 405e9 * 4 * 3 / 8 * 0.99  # params + Adam, / 8

    def dots(model):
        lowered = planner.lower_train_step(dataclasses.replace(w, model=model))
        return lowered.as_text().count("dot_general")

    assert dots(w.model) == dots(w.model.replace(n_layers=6)) > 0


def _unpipelined_405b(devices):
    c = _config("llama3.1-405b")
    c.mesh.update(pipe=1)
    return planner.workload_from_config(c, devices, kinds=KINDS)


def test_does_not_fit_names_the_biggest_term_and_what_to_change():
    w = _unpipelined_405b(64)  # FSDP 8 x TP 8, no pipeline
    p = planner.plan(w, device_memory=planner.parse_bytes("80GiB"))  # 32 rows of 8,192 tokens per device
    assert p.fits is False and p.biggest == "activations"
    assert "the biggest term is activations" in p.report() and "remat" in p.report()
    # One short row per device with full remat: Adam's moments (2 x 405.8e9 x 4 bytes / 64) are the biggest.
    small = dataclasses.replace(w, global_batch=8, seq_len=4096, model=w.model.replace(remat="full"))
    p = planner.plan(small, device_memory=planner.parse_bytes("80GiB"))
    assert p.optimizer == 2 * p.params and abs(p.params - 405.8e9 * 4 / 64) / p.params < 0.01
    assert p.fits is False and p.biggest == "optimizer"
    report = p.report()
    assert "does not fit" in report and "the biggest term is optimizer" in report and "mesh.fsdp" in report
    w8 = planner.workload_from_config(_config("llama3.1-8b"), 64, kinds=KINDS)
    ok = planner.plan(dataclasses.replace(w8, grad_accum=8, model=w8.model.replace(remat="full")),
                      device_memory=planner.parse_bytes("80GiB"))
    assert ok.fits is True and "fits in 80.00 GiB" in ok.report()


def _residual_probe(x, w):
    h = jnp.tanh(x @ w).astype(jnp.bfloat16)
    return jnp.sum(jnp.where(h > 0, h, 0).astype(jnp.float32) * jnp.arange(w.shape[1], dtype=jnp.int32))


def test_saved_residuals_fall_back_to_the_public_printer(monkeypatch, caplog):
    """A JAX that moves `jax._src.ad_checkpoint.saved_residuals` (the import fails) or changes what it returns
    gives the same residuals, read from `jax.ad_checkpoint.print_saved_residuals`, and the same plan."""
    args = (jax.ShapeDtypeStruct((4, 8), jnp.float32), jax.ShapeDtypeStruct((8, 16), jnp.float32))
    private = jax_compat.saved_residuals(_residual_probe, *args)
    assert private == jax_compat.printed_saved_residuals(_residual_probe, *args)
    assert {r.dtype for r in private} >= {jnp.dtype("bfloat16"), jnp.dtype("bool")}
    assert any(r.is_argument for r in private) and not all(r.is_argument for r in private)
    w = planner.workload_from_config(_config("tiny"), 8, kinds=KINDS)
    local, rows, length = planner.local_workload(w)
    planned = planner.saved_activation_bytes(local, rows, length, 0)
    assert planned > 0

    monkeypatch.setitem(sys.modules, "jax._src.ad_checkpoint", None)  # the private import now fails
    assert jax_compat._private_saved_residuals() is None
    assert jax_compat.saved_residuals(_residual_probe, *args) == private
    assert planner.saved_activation_bytes(local, rows, length, 0) == planned

    monkeypatch.delitem(sys.modules, "jax._src.ad_checkpoint")  # importable again, but answering in another form
    monkeypatch.setattr(jax_compat, "_private_saved_residuals", lambda: lambda f, *a: [object()])
    assert jax_compat.saved_residuals(_residual_probe, *args) == private
    assert "print_saved_residuals instead" in caplog.text


def test_plan_resolves_auto_attention_as_the_run_does():
    w = planner.workload_from_config(_config("tiny"), 8, kinds=KINDS)
    assert w.model.attention == "auto"
    for platform in ("cpu", "gpu", "tpu"):
        for mesh in (dict(w.mesh), {"data": 4, "fsdp": 1, "context": 2, "tensor": 1}):
            cp = dataclasses.replace(w, mesh=mesh)
            want = attention.choose(platform=platform, dtype=w.model.dtype, training=True, length=w.seq_len,
                                    context_parallel=mesh["context"] > 1)
            assert planner.local_workload(cp, platform)[0].attention == want
    cp = dataclasses.replace(w, mesh={"data": 4, "fsdp": 1, "context": 2, "tensor": 1})
    assert planner.local_workload(cp, "cpu")[0].attention == "xla_chunked"
    with pytest.raises(ValueError, match="'splash'.*context parallelism"):
        planner.local_workload(dataclasses.replace(cp, model=w.model.replace(attention="splash")), "tpu")
    with pytest.raises(ValueError, match=r"global batch size 12 is not divisible by data x fsdp = 8 devices"):
        planner.local_workload(dataclasses.replace(w, global_batch=12))


def test_plan_command_json_with_compile_is_within_15_percent_for_tiny():
    out = subprocess.run([sys.executable, "-m", "llama_jax.plan", "--config=experiments/pretrain.py:tiny",
                          "--devices=8", "--device_memory=16GiB", "--compile", "--json"], cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fits"] is True and result["devices"] == 8
    assert 0.85 <= result["planned_bytes_per_device"] / result["compiled_bytes_per_device"] <= 1.15, result


def test_plan_command_errors_are_one_line():
    out = subprocess.run([sys.executable, "-m", "llama_jax.plan", "--config=experiments/pretrain.py:tiny",
                          "--devices=3"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("llama_jax: error: ")
