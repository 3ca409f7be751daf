"""Stage kinds long_context and anneal in the driver: a failed gate stops naming gate, value and threshold; a
rerun after fixing the config resumes and passes; annealing averages its checkpoints into the final model.
The run uses context parallelism (mesh context 4 x data 2) throughout. Also, without training: every
extension stage is gated against the short-context model it started from, the needle gate checks every length
up to the stage's, and an anneal writes and keeps the checkpoints it averages (the paper variant included)."""
import importlib.util
import json
import os
import pathlib
import types

import jax
import numpy as np
import optax
import pytest

from llama_jax import experiment as E
from llama_jax import workdir as workdir_lib
from llama_jax.model import transformer
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.stages import KINDS
from llama_jax.train import driver, stage_run
from llama_jax.train import step as step_lib
from llama_jax.stages import anneal as anneal_lib
from llama_jax.stages import long_context as long_lib
from llama_jax.stages.anneal import data_value_report
from llama_jax.stages.long_context import GateFailed
from tests.train.test_driver import _config


def _stages(threshold):
    gates = dict(short_seq_len=32, short_tolerance=1.0, needle_threshold=threshold, needle_trials=1,
                 needle_depths=[0.5], needle_lengths=[64, 128])
    return [E.stage("pretrain", [E.phase(32, 8)], E.optim(1e-3, 1), steps=2),
            E.stage("long", [E.phase(128, 2)], E.optim(1e-3, 1), steps=2, kind="long_context", options=gates),
            E.stage("anneal", [E.phase(128, 2)], E.optim(1e-3, 0, decay="linear", final_lr_ratio=0.0), steps=4,
                    kind="anneal", options=dict(average_last=2),
                    data=dict(sources=[dict(name="stdlib_prose", kind="corpus", path="prose", weight=1.0)]))]


def test_gates_stop_then_resume_and_anneal_averages(data_cache, tmp_path):
    c = _config(data_cache, **{"mesh.context": 4, "eval.batches": 1, "checkpoint.every_steps": 4})
    c.stages = _stages(threshold=1.0)
    wd = str(tmp_path / "run")
    with pytest.raises(GateFailed, match=r"stage 'long': gate 'needle' failed at length 128: measured 0\.0000, "
                                         r"needs >= 1"):
        driver.run_experiment(c, wd, KINDS)
    long_dir = workdir_lib.stage_dir(wd, "long")
    assert os.path.exists(os.path.join(long_dir, "gates.json")) and os.path.exists(os.path.join(long_dir, "needle.png"))
    assert workdir_lib.read_done(wd, "long") is None and workdir_lib.read_done(wd, "pretrain") is not None

    c.stages = _stages(threshold=0.0)  # fixed config: the rerun resumes the stage at its final checkpoint
    results = driver.run_experiment(c, wd, KINDS, allow_config_change=True)
    long = results["long"]
    assert long["step"] == 2 and long["gates"]["gate_needle"]["passed"]
    assert sorted(long["gates"]["gate_needle"]["by_length"]) == ["128", "64"]
    short = long["gates"]["gate_short_loss"]
    assert long["short_model"] == "previous:pretrain"  # measured again from its checkpoint: the same loss
    assert short["reference"] == pytest.approx(results["pretrain"]["eval_loss"])
    assert short["value"] == pytest.approx(long["short_loss"] - results["pretrain"]["eval_loss"])

    anneal = results["anneal"]
    # the run saves every 4 steps; the 4-step anneal averaging 2 saves every 2 steps on its own
    assert anneal["averaged_steps"] == [2, 4] == anneal_lib.averaged_steps(E.resolve(c, KINDS)[2])
    assert anneal["averaged_checkpoint"] == 5
    cfg = E.resolve(c, KINDS)[2].model
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                            transformer.param_shapes(cfg))
    d = workdir_lib.checkpoints_dir(wd, "anneal")
    p2, p4, p5 = (jax.device_get(ckpt_lib.load_params(d, abstract, s)[0]) for s in (2, 4, 5))
    jax.tree.map(lambda a, b, m: np.testing.assert_array_equal(m, (a + b) / np.float32(2)), p2, p4, p5)
    assert anneal["averaged_loss"] != anneal["last_checkpoint_loss"]


def test_bad_options_and_lengths_are_named(data_cache):
    c = _config(data_cache)
    c.stages = _stages(0.0)
    c.stages[1]["options"]["needle_treshold"] = 0.5
    with pytest.raises(ValueError, match=r"stage 'long' \(long_context\): unknown option\(s\) \['needle_treshold'\]"):
        E.resolve(c, KINDS)
    c.stages = _stages(0.0)
    c.stages[1]["phases"] = [E.phase(4096, 1)]
    with pytest.raises(ValueError, match="stage 'long': seq_len 4096 exceeds the model's max_seq_len 2048"):
        E.resolve(c, KINDS)
    c.stages = _stages(0.0)
    c.mesh.context = 4
    c.stages[1]["phases"] = [E.phase(36, 4)]
    with pytest.raises(ValueError, match=r"stage 'long': seq_len 36 cannot be split over mesh.context=4"):
        E.resolve(c, KINDS)


def _losses(wd, stage):
    seen = {}
    for line in open(workdir_lib.metrics_path(str(wd))):
        rec = json.loads(line)
        if f"{stage}/train/loss" in rec:
            seen[rec["step"]] = rec[f"{stage}/train/loss"]  # the last write of each step wins (resumed runs append)
    return [seen[s] for s in sorted(seen)]


def _stage_params(wd, stage, cfg, step=None):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev),
                            transformer.param_shapes(cfg))
    return jax.device_get(ckpt_lib.load_params(workdir_lib.checkpoints_dir(str(wd), stage), abstract, step)[0])


def test_resume_inside_a_long_context_stage_is_exact(data_cache, tmp_path, monkeypatch):
    """A crash after step 3 of the 5-step long-context stage (context 4 x data 2): the rerun restores the
    stage's checkpoint at step 2 (parameters, AdamW state, data position) and ends bitwise where an
    uninterrupted run ends: same batches, same losses, same parameters."""
    c = _config(data_cache, **{"mesh.context": 4, "eval.batches": 1, "log_every_steps": 1,
                               "debug.log_batches": True})
    gates = dict(short_seq_len=32, short_tolerance=10.0, needle_threshold=0.0, needle_trials=1, needle_depths=[0.5],
                 needle_lengths=[64])
    c.stages = [E.stage("pretrain", [E.phase(32, 8)], E.optim(1e-3, 1), steps=2),
                E.stage("long", [E.phase(64, 4)], E.optim(1e-3, 1), steps=5, kind="long_context", options=gates)]
    ref, wd = tmp_path / "ref", tmp_path / "crashed"
    driver.run_experiment(c, str(ref), KINDS)

    original = stage_run.StageRun.periodic

    def crash_at_3(self, step, state, info, *args):
        if self.name == "long" and step == 3:
            raise KeyboardInterrupt("simulated kill after step 3")
        return original(self, step, state, info, *args)

    monkeypatch.setattr(stage_run.StageRun, "periodic", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        driver.run_experiment(c, str(wd), KINDS)
    assert ckpt_lib.list_steps(workdir_lib.checkpoints_dir(str(wd), "long")) == [0, 2]
    monkeypatch.setattr(stage_run.StageRun, "periodic", original)
    driver.run_experiment(c, str(wd), KINDS)

    def crcs(w):
        seen = {}
        for line in open(workdir_lib.batches_path(str(w), "long")):
            rec = json.loads(line)
            seen[rec["step"]] = rec["crc32"]
        return [seen[s] for s in sorted(seen)]

    assert len(crcs(ref)) == 5 and crcs(wd) == crcs(ref)
    assert len(_losses(ref, "long")) == 5 and _losses(wd, "long") == _losses(ref, "long")
    cfg = E.resolve(c, KINDS)[1].model
    jax.tree.map(np.testing.assert_array_equal, _stage_params(wd, "long", cfg), _stage_params(ref, "long", cfg))


def _opt_leaves(wd, stage, c, step):
    """{"mu", "nu", "adam_count", "schedule_count"} of a stage checkpoint's AdamW state, on the host."""
    st = next(s for s in E.resolve(c, KINDS) if s.name == stage)
    mesh = mesh_lib.make_mesh(c.mesh.to_dict())
    abstract = step_lib.abstract_train_state(st.model, st.optim, mesh, rules_lib.get_rules(c.sharding_rules))
    items, _, _ = ckpt_lib.load_state_items(workdir_lib.checkpoints_dir(str(wd), stage),
                                            {"opt_state": abstract.opt_state}, step)
    leaves = jax.tree.leaves(jax.device_get(items["opt_state"]),
                             is_leaf=lambda x: isinstance(x, (optax.ScaleByAdamState, optax.ScaleByScheduleState)))
    adam = next(x for x in leaves if isinstance(x, optax.ScaleByAdamState))
    sched = next(x for x in leaves if isinstance(x, optax.ScaleByScheduleState))
    return {"mu": adam.mu, "nu": adam.nu, "adam_count": int(adam.count), "schedule_count": int(sched.count)}


@pytest.mark.parametrize("carry", [True, False])
def test_stage_transition_carries_params_optimizer_and_data_as_configured(data_cache, tmp_path, carry):
    """pretrain (3 steps of 8 x 32) -> long (2 steps of 4 x 64), mesh context 2 x data 4. Parameters always carry over. carry=True (the
    paper's setting, the default): AdamW's moments and count carry over, the LR schedule restarts, and the
    long stage's batches are exactly the ones a single stage ramping 8 x 32 -> 4 x 64 at step 3 reads (one
    document stream, nothing repeated). carry=False: zero moments and the long stage's own stream."""
    c = _config(data_cache, **{"mesh.context": 2, "eval.batches": 1, "log_every_steps": 1, "debug.log_batches": True,
                               "checkpoint.every_steps": 1})
    opts = dict(short_seq_len=32, short_tolerance=10.0, needle_threshold=0.0, needle_trials=1, needle_depths=[0.5],
                needle_lengths=[64], carry_optimizer=carry, continue_data=carry)
    c.stages = [E.stage("pretrain", [E.phase(32, 8)], E.optim(1e-3, 1), steps=3),
                E.stage("long", [E.phase(64, 4)], E.optim(1e-3, 1), steps=2, kind="long_context", options=opts)]
    wd = tmp_path / "run"
    results = driver.run_experiment(c, str(wd), KINDS)
    cfg = E.resolve(c, KINDS)[1].model
    jax.tree.map(np.testing.assert_array_equal, _stage_params(wd, "long", cfg, 0),
                 _stage_params(wd, "pretrain", cfg))
    before, after = _opt_leaves(wd, "pretrain", c, 3), _opt_leaves(wd, "long", c, 0)
    assert before["adam_count"] == 3 and after["schedule_count"] == 0
    if carry:
        assert after["adam_count"] == 3
        jax.tree.map(np.testing.assert_array_equal, after["mu"], before["mu"])
        jax.tree.map(np.testing.assert_array_equal, after["nu"], before["nu"])
    else:
        assert after["adam_count"] == 0
        assert all(not np.any(x) for x in jax.tree.leaves((after["mu"], after["nu"])))
    assert _opt_leaves(wd, "long", c, 2)["schedule_count"] == 2
    assert results["long"]["step"] == 2

    ramp = _config(data_cache, **{"mesh.context": 2, "debug.log_batches": True})
    ramp.stages = [E.stage("pretrain", [E.phase(32, 8, until_tokens=3 * 256), E.phase(64, 4)], E.optim(1e-3, 1),
                           steps=5)]
    one = tmp_path / "one_stream"
    driver.run_experiment(ramp, str(one), KINDS)

    def crcs(w, stage):
        return [json.loads(line)["crc32"] for line in open(workdir_lib.batches_path(str(w), stage))]

    assert crcs(wd, "pretrain") == crcs(one, "pretrain")[:3]
    if carry:
        assert crcs(wd, "long") == crcs(one, "pretrain")[3:]
    else:
        assert not set(crcs(wd, "long")) & set(crcs(one, "pretrain")[3:])


def test_data_value_probe_anneals_one_checkpoint_with_and_without_the_new_source(data_cache, tmp_path):
    """Two anneals of the same half-trained checkpoint (code only; prose as the new source at 30%): both start
    from its parameters, evaluate the same held-out data, and the report is the difference of their losses."""
    c = _config(data_cache, **{"eval.batches": 1})
    code = dict(name="stdlib_code", kind="corpus", path="code", weight=1.0)
    prose = dict(name="stdlib_prose", kind="corpus", path="prose")
    c.data.sources = [code]
    c.stages = [E.stage("pretrain", [E.phase(32, 8)], E.optim(1e-3, 1, schedule_steps=4), steps=2)]
    c.stages += E.data_value_probe("pretrain", [code], prose, 0.3, [E.phase(32, 8)],
                                   E.optim(1e-3, 0, decay="linear", final_lr_ratio=0.0), steps=2)
    stages = {s.name: s for s in E.resolve(c, KINDS)}
    assert stages["probe_base"].init_source == stages["probe_new"].init_source == "previous:pretrain"
    assert [s["weight"] for s in stages["probe_base"].data["sources"]] == [1.0, 0.0]
    assert [s["weight"] for s in stages["probe_new"].data["sources"]] == pytest.approx([0.7, 0.3])
    results = driver.run_experiment(c, str(tmp_path / "run"), KINDS)
    cfg = stages["pretrain"].model
    start = _stage_params(tmp_path / "run", "pretrain", cfg)
    for name in ("probe_base", "probe_new"):
        jax.tree.map(np.testing.assert_array_equal, _stage_params(tmp_path / "run", name, cfg, 0), start)
    report = data_value_report(results)
    assert report["base_loss"] == results["probe_base"]["averaged_loss"]
    assert report["gain"] == pytest.approx(report["base_loss"] - report["new_loss"])
    assert report["base_loss"] != report["new_loss"]
    with pytest.raises(ValueError, match=r"weight=1.5 must be in \(0, 1\)"):
        E.data_value_probe("pretrain", [code], prose, 1.5, [E.phase(32, 8)], E.optim(1e-3, 0), steps=2)
    with pytest.raises(ValueError, match=r"stage\(s\) \['probe_new'\] recorded no held-out loss"):
        data_value_report({"probe_base": results["probe_base"]})


def _experiment(variant="paper"):
    path = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "long_context.py"
    spec = importlib.util.spec_from_file_location("long_context_experiment", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config(variant)


def test_paper_anneal_writes_keeps_and_averages_several_checkpoints(tmp_path):
    """The paper's anneal: 40M tokens at 32 x 131,072 = 4,194,304 tokens per step is ceil(9.54) = 10 steps, while
    the run checkpoints every 500 steps and keeps 3: the anneal saves every 10 // 5 = 2 steps and keeps 5, so it
    averages steps 2, 4, 6, 8, 10. A stage checkpoint setting that cannot give 5 is refused, naming both."""
    c = _experiment()
    c.init_from = str(tmp_path)  # the 8K model's checkpoints (a directory; nothing is read at resolve)
    assert (c.checkpoint.every_steps, c.checkpoint.keep) == (500, 3)
    stage = E.resolve(c, KINDS)[-1]
    assert stage.kind == "anneal" and stage.total_steps == 10
    assert (stage.checkpoint_every, stage.checkpoint_keep) == (2, 5)
    assert anneal_lib.averaged_steps(stage) == [2, 4, 6, 8, 10]
    for own, written, keep in ((dict(every_steps=500, keep=3), 1, 3), (dict(every_steps=2, keep=3), 5, 3),
                               (dict(every_steps=3), 4, 3)):
        c.stages[-1]["checkpoint"] = own
        with pytest.raises(ValueError, match=rf"stage 'anneal' \(anneal\) averages its last 5 checkpoints .*"
                                             rf"every_steps={own['every_steps']} writes {written} in its 10 steps "
                                             rf"and checkpoint.keep={keep} keeps {keep}"):
            E.resolve(c, KINDS)
    c.stages[-1]["checkpoint"] = dict(every_steps=1, keep=5)  # a cadence of its own that gives them: kept
    stage = E.resolve(c, KINDS)[-1]
    assert anneal_lib.averaged_steps(stage) == [6, 7, 8, 9, 10] and stage.checkpoint_keep == 5
    c.stages[-1]["checkpoint"] = {}
    c.stages[-1]["options"]["average_last"] = 11
    with pytest.raises(ValueError, match=r"average_last=11 checkpoints cannot come from its 10 steps"):
        E.resolve(c, KINDS)


def test_paper_gates_every_stage_from_the_8k_model_and_every_needle_length():
    c = _experiment()
    with pytest.raises(ValueError, match=r"stage 'long_16k' \(long_context\) starts from scratch, but its gates "
                                         r"compare with the short-context model it extends: set config.init_from"):
        E.resolve(c, KINDS)
    long = [st for st in c.stages if st["kind"] == "long_context"]
    assert [st["options"]["needle_lengths"][-1] for st in long] == [16384, 32768, 65536, 98304, 131072, 131072]
    assert all(st["options"]["needle_lengths"][0] == st["options"]["short_seq_len"] == 8192 for st in long)


def test_needle_gate_fails_at_any_length_up_to_the_stage():
    gate = long_lib.needle_gate({8192: 1.0, 16384: 0.75, 32768: 1.0}, 1.0)
    assert not gate["passed"] and (gate["value"], gate["length"]) == (0.75, 16384)
    assert long_lib.needle_gate({8192: 1.0, 16384: 1.0}, 1.0)["passed"]
    assert long_lib.needle_gate({64: 0.0, 128: 0.0}, 0.5)["length"] == 128  # of equals, the longest
    options = types.SimpleNamespace(needle_lengths=(), short_seq_len=256)
    assert long_lib.needle_lengths(options, 2048) == (256, 512, 1024, 2048)
    assert long_lib.needle_lengths(options, 1536) == (256, 512, 1024, 1536)


def test_a_stage_checkpoint_setting_is_its_own_and_checked():
    c = _experiment("tiny")
    c.stages[0]["checkpoint"] = dict(every_steps=7, keep=2)
    pretrain, long = E.resolve(c, KINDS)[:2]
    assert (pretrain.checkpoint_every, pretrain.checkpoint_keep) == (7, 2)
    assert (long.checkpoint_every, long.checkpoint_keep) == (c.checkpoint.every_steps, c.checkpoint.keep)
    for own, message in ((dict(every=7), r"unknown checkpoint key\(s\) \['every'\]"),
                         (dict(keep=0), r"checkpoint.keep=0 must be an integer >= 1")):
        c.stages[0]["checkpoint"] = own
        with pytest.raises(ValueError, match=rf"stage 'pretrain': {message}"):
            E.resolve(c, KINDS)


def test_needle_lengths_beyond_the_stage_are_refused():
    c = _experiment("tiny")
    assert [st["options"]["needle_lengths"] for st in c.stages[1:4]] == [[256, 512], [256, 512, 1024],
                                                                          [256, 512, 1024, 2048]]
    c.stages[1]["options"]["needle_lengths"] = [256, 1024]
    with pytest.raises(ValueError, match=r"stage 'long_512': needle length 1024 must be in \[1, 512\]"):
        E.resolve(c, KINDS)


def test_every_extension_stage_compares_with_the_short_context_model(tmp_path):
    """The short-context model passes along a run of long_context stages: a first stage from init_from or from a
    pretraining stage is its own reference; a later stage takes the one its previous stage recorded."""
    wd = str(tmp_path)
    for name in ("pretrain", "long_16k"):
        os.makedirs(workdir_lib.stage_dir(wd, name))
    workdir_lib.write_json_atomic(workdir_lib.done_path(wd, "pretrain"), {"eval_loss": 3.0})
    workdir_lib.write_json_atomic(workdir_lib.done_path(wd, "long_16k"), {"short_model": "init_from:/ckpt/8k"})

    def origin(name, init_source):
        return long_lib.short_model(types.SimpleNamespace(workdir=wd, stage=types.SimpleNamespace(
            name=name, init_source=init_source, previous=init_source.partition(":")[2]
            if init_source.startswith("previous:") else None)))

    assert origin("long_16k", "init_from:/ckpt/8k") == "init_from:/ckpt/8k"
    assert origin("long_32k", "previous:long_16k") == "init_from:/ckpt/8k"  # not the 16K stage
    assert origin("long_64", "previous:pretrain") == "previous:pretrain"
