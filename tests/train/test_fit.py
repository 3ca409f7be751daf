"""Every paper variant fits the hardware it names (the memory planner, on the config's `plan_devices` at 80 GiB),
and a run whose step cannot fit its devices stops before it builds any data or parameters; a checkpoint does not
depend on the pipeline degree."""

import importlib.util
import os
import pathlib

import jax
import numpy as np
import pytest

from llama_jax import experiment as E
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.stages import KINDS
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.train import driver, planner
from llama_jax.train import step as step_lib
from llama_jax.model import config as model_config

REPO = pathlib.Path(__file__).resolve().parents[2]
H100 = 80 * 2 ** 30


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / f"experiments/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _posttrain_arg(tmp_path) -> str:
    prompt = '{"role": "user", "content": "hi"}'
    lines = {"sft": '{"messages": [%s, {"role": "assistant", "content": "hello"}]}' % prompt,
             "prompts": '{"prompt": [%s]}' % prompt, "tokenizer": "",
             "prefs": '{"prompt": [%s], "chosen": "a", "rejected": "b", "strength": "better"}' % prompt}
    for name, line in lines.items():
        (tmp_path / f"{name}.jsonl").write_text(line + "\n")
    (tmp_path / "init").mkdir(exist_ok=True)
    return (f"paper,sft={tmp_path}/sft.jsonl,prompts={tmp_path}/prompts.jsonl,tokenizer={tmp_path}/tokenizer.jsonl,"
            f"preferences={tmp_path}/prefs.jsonl,init={tmp_path}/init,sampler={tmp_path}/init,rounds=1")


def _paper_configs(tmp_path):
    for variant in ("llama3.1-8b", "llama3.1-70b", "llama3.1-405b", "llama3.2-1b"):
        yield f"pretrain.py:{variant}", _load("pretrain").get_config(variant)
    c = _load("long_context").get_config("paper")
    (tmp_path / "init").mkdir(exist_ok=True)
    c.init_from = str(tmp_path / "init")
    yield "long_context.py:paper", c
    for size in ("8b", "70b", "405b"):
        yield f"posttrain.py:paper,size={size}", _load("posttrain").get_config(f"{_posttrain_arg(tmp_path)},size={size}")


def test_every_paper_variant_fits_80gib_on_the_devices_it_names(tmp_path):
    checked = {}
    for name, c in _paper_configs(tmp_path):
        assert c.plan_devices > 0, name
        for st in E.resolve(c, KINDS):
            if st.total_steps == 0:  # rejection sampling and averaging train nothing
                continue
            w = planner.stage_workload(c, st, c.plan_devices, frozen_models=KINDS[st.kind].frozen_models)
            key = (w.model, dict(w.mesh).items().__repr__(), w.seq_len, w.global_batch, w.grad_accum, w.frozen_models)
            if key not in checked:
                p = planner.plan(w, device_memory=H100)
                checked[key] = (f"{name} stage {st.name}", p.fits, planner.format_bytes(p.total))
                assert p.fits, (name, st.name, p.report())
    kinds = {k[0] for k in checked}
    assert len(checked) >= 12, kinds
    # the 405B pretraining step is pipelined on the paper's mesh (Table 4)
    c = _load("pretrain").get_config("llama3.1-405b")
    w = planner.workload_from_config(c, c.plan_devices, kinds=KINDS)
    assert dict(w.mesh) == {"data": 1, "fsdp": 64, "pipe": 16, "context": 1, "tensor": 8}
    assert w.pipeline.lighter_ends == 1 and w.model.remat == "none"
    sched = planner.plan(w, device_memory=H100).schedule
    assert sched["bubble"] == pytest.approx(15 / (4 * 16 + 15))  # (P - 1) / (V M + P - 1)


def test_a_step_that_cannot_fit_stops_before_any_data_or_parameter_is_built(tmp_path):
    c = _load("pretrain").get_config("llama3.2-1b")  # ~60 GiB per device planned on 8 simulated CPU devices
    workdir = tmp_path / "w"
    with pytest.raises(ValueError) as e:
        driver.run_experiment(c, str(workdir), KINDS)
    message = str(e.value)
    assert "\n" not in message and message.startswith("stage 'pretrain' does not fit: planned ")
    assert "host memory / 8 local devices" in message and "skip_fit_check" in message and "To change:" in message
    assert not os.path.exists(workdir) or not any(workdir.rglob("*")), list(workdir.rglob("*"))


def test_a_checkpoint_restores_exactly_across_pipeline_degrees(tmp_path):
    cfg = model_config.tiny()
    optim = E.OptimConfig()
    rules = rules_lib.get_rules("fsdp")
    piped = mesh_lib.make_mesh({"pipe": 4, "fsdp": 2})
    state, _ = step_lib.init_train_state(cfg, optim, piped, rules, jax.random.key(3))
    ckpts = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=False)
    ckpts.save(7, state, None, {"step": 7})
    ckpts.wait()
    for shape in ({"data": -1}, {"pipe": 2, "tensor": 2, "data": 2}):
        mesh = mesh_lib.make_mesh(shape)
        restored, _ = ckpts.restore(7, step_lib.abstract_train_state(cfg, optim, mesh, rules), None)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert all(x.sharding.mesh.shape == mesh.shape for x in jax.tree.leaves(restored.params))


def test_the_planner_resolves_the_loss_chunk_for_the_platform_it_plans():
    """A stage that leaves `loss_chunk` at -1 gets the planned platform's chunk, not that of the host planning."""
    c = _load("pretrain").get_config("tiny")
    st = E.resolve(c, KINDS)[0]
    assert st.loss_chunk_setting == -1 and st.loss_chunk == E.resolve_chunk(-1, jax.default_backend())
    w = planner.stage_workload(c, st, 8)
    for platform, chunk in (("gpu", 512), ("cpu", 128), ("tpu", 0)):
        assert planner.plan(w, platform=platform).workload.loss_chunk == chunk
