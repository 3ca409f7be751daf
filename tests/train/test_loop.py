"""The experiment driver: stages, exact resume after SIGKILL, resharding restore, NaN skip and rollback,
corrupted checkpoints, and one-line errors from the command line."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from llama_jax import experiment as E
from llama_jax import model
from llama_jax.model import config as model_config
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.sharding import rules as rules_lib
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.stages import KINDS
from llama_jax.train import driver, stage_run
from tests.train.faults import faulty
from llama_jax.train import step as step_lib
from llama_jax.train.optim import OptimConfig
from tests.train.helpers import pretrain_config

REPO = pathlib.Path(__file__).resolve().parents[2]
SMALL = "tiny,steps=12,batch=8,seq_len=32,warmup=2,layers=2"


def _config(data_cache, arg=SMALL, **updates):
    return pretrain_config(data_cache, arg, checkpoint_every=4, eval_batches=1, max_new_tokens=4, **updates)


def test_two_stage_experiment_runs_both_and_skips_the_first_on_restart(data_cache, tmp_path):
    c = _config(data_cache, "tiny,steps=6,batch=16,seq_len=32,warmup=2,stages=2,layers=2")
    results = driver.run_experiment(c, str(tmp_path), KINDS)
    assert set(results) == {"pretrain", "long_context"}
    assert results["pretrain"]["step"] == 6 and results["long_context"]["step"] == 2
    assert results["long_context"]["tokens"] == 2 * 8 * 64  # batch 8 x seq 64: the stage's own shape
    assert np.isfinite(results["long_context"]["eval_loss"])
    assert len(results["pretrain"]["samples"]) == 2
    # The second stage started from the first stage's final parameters.
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert any("long_context/train/loss" in m for m in metrics)
    done_mtime = os.path.getmtime(tmp_path / "stages/pretrain/DONE.json")
    again = driver.run_experiment(c, str(tmp_path), KINDS)
    assert again["pretrain"]["step"] == 6
    assert os.path.getmtime(tmp_path / "stages/pretrain/DONE.json") == done_mtime  # not rerun


def test_loss_falls_on_the_embedded_corpus(data_cache, tmp_path):
    c = _config(data_cache, "tiny,steps=30,batch=8,seq_len=64,warmup=5,lr=3e-3,layers=2")
    c.log_every_steps = 1
    c.eval.every_steps = 5  # the host is busy between some dispatches: a blocking save or an evaluation
    c.checkpoint.async_save = False
    driver.run_experiment(c, str(tmp_path), KINDS)
    records = [m for m in map(json.loads, open(tmp_path / "metrics.jsonl")) if "pretrain/train/loss" in m]
    losses = [m["pretrain/train/loss"] for m in records]
    assert losses[0] > 7.5 and np.mean(losses[-3:]) < losses[0] - 1.5, losses
    # Step timing: the step after a blocking save or evaluation is not timed as (nearly) free.
    rates = [m["pretrain/train/tokens_per_s"] for m in records if m.get("pretrain/train/tokens_per_s")]
    assert len(rates) >= 20 and max(rates) < 3 * float(np.median(rates)), rates
    assert max(m["pretrain/train/mfu"] for m in records if "pretrain/train/mfu" in m) < 1.0


def _main_cmd(workdir, data_cache, *extra):
    return [sys.executable, "-m", "llama_jax.main", f"--config={REPO}/experiments/pretrain.py:{SMALL}",
            f"--workdir={workdir}", f"--config.data.cache_dir={data_cache}",
            "--config.checkpoint.every_steps=4", "--config.eval.batches=0", "--config.sample.max_new_tokens=0",
            "--config.debug.log_batches=True", *extra]


def _final_params(workdir):
    cfg = model_config.get("tiny", n_layers=2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=mesh_lib.replicated(mesh_lib.make_mesh())),
                            model.param_shapes(cfg))
    params, step = ckpt_lib.load_params(os.path.join(workdir, "stages/pretrain/checkpoints"), abstract)
    return jax.device_get(params), step


def _batches_by_step(workdir):
    seen = {}
    for line in open(os.path.join(workdir, "stages/pretrain/batches.jsonl")):
        rec = json.loads(line)
        seen[rec["step"]] = rec["crc32"]
    return [seen[i] for i in sorted(seen)]


@pytest.fixture(scope="module")
def reference_run(data_cache, tmp_path_factory):
    """An uninterrupted 12-step run of the command-line job."""
    ref_dir = tmp_path_factory.mktemp("reference")
    subprocess.run(_main_cmd(ref_dir, data_cache), check=True, capture_output=True, timeout=600)
    return ref_dir


def _wait_for(path: pathlib.Path, proc, lines: int = 0, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and (not lines or len(path.read_text().splitlines()) >= lines):
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear before the run ended (exit code {proc.poll()})")


def _assert_same_as_reference(workdir, reference_run):
    ref_params, ref_step = _final_params(reference_run)
    params, step = _final_params(workdir)
    assert step == ref_step == 12
    jax.tree.map(np.testing.assert_array_equal, params, ref_params)
    assert _batches_by_step(workdir) == _batches_by_step(reference_run)
    assert len(_batches_by_step(reference_run)) == 12


def test_sigkill_mid_stage_then_resume_is_bitwise_identical(data_cache, tmp_path, reference_run):
    cmd = _main_cmd(tmp_path, data_cache, "--config.log_every_steps=1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(tmp_path / "stages/pretrain/checkpoints/4", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "stages/pretrain/DONE.json").exists()
    assert 4 in _logged_steps(tmp_path)  # the metrics row of step 4 was written before its checkpoint
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    _assert_same_as_reference(tmp_path, reference_run)
    assert _logged_steps(tmp_path) == list(range(1, 13))  # a resumed run writes no step twice


def test_sigkill_before_the_first_periodic_checkpoint_resumes_from_step_0_bitwise(data_cache, tmp_path,
                                                                                 reference_run):
    # Only the stage's step-0 checkpoint exists when the run is killed: the data iterator's state at a document
    # boundary must survive its JSON round trip, or the resumed run reads other batches.
    cmd = _main_cmd(tmp_path, data_cache, "--config.checkpoint.every_steps=100")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(tmp_path / "stages/pretrain/batches.jsonl", proc, lines=3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    steps = sorted(p.name for p in (tmp_path / "stages/pretrain/checkpoints").iterdir() if p.name.isdigit())
    assert steps == ["0"], steps
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    _assert_same_as_reference(tmp_path, reference_run)


def _logged_steps(workdir) -> list[int]:
    return [m["step"] for m in map(json.loads, open(workdir / "metrics.jsonl")) if "pretrain/train/loss" in m]


def test_sigterm_saves_a_checkpoint_and_the_resumed_run_is_identical(data_cache, tmp_path, reference_run):
    cmd = _main_cmd(tmp_path, data_cache, "--config.checkpoint.every_steps=100", "--config.log_every_steps=1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for(tmp_path / "stages/pretrain/batches.jsonl", proc, lines=3)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    # exit status 75: "preempted, checkpoint saved", which a scheduler tells apart from a failure
    assert proc.returncode == stage_run.EXIT_PREEMPTED and "SIGTERM: checkpoint saved at step" in err, err[-2000:]
    steps = sorted(int(p.name) for p in (tmp_path / "stages/pretrain/checkpoints").iterdir() if p.name.isdigit())
    assert steps[-1] >= 3 and steps[-1] < 12  # saved at the step boundary where the signal was seen
    assert _logged_steps(tmp_path)[-1] == steps[-1]  # the checkpointed step's metrics row was written first
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    _assert_same_as_reference(tmp_path, reference_run)
    assert _logged_steps(tmp_path) == list(range(1, 13))  # every step once, the resumed ones included


def test_init_from_starts_from_another_runs_parameters(data_cache, tmp_path, reference_run):
    c = _config(data_cache, "tiny,steps=2,batch=8,seq_len=32,warmup=2,layers=2",
                init_from=str(reference_run / "stages/pretrain/checkpoints"))
    c.sample.max_new_tokens = 0
    c.eval.batches = 0
    driver.run_experiment(c, str(tmp_path), KINDS)
    ref_params, _ = _final_params(reference_run)
    # Step 0 of the new run is the reference's final parameters (checkpointed at the start of the stage).
    cfg = model_config.get("tiny", n_layers=2)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=mesh_lib.replicated(mesh_lib.make_mesh())),
                            model.param_shapes(cfg))
    start, _ = ckpt_lib.load_params(os.path.join(tmp_path, "stages/pretrain/checkpoints"), abstract, step=0)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(start), ref_params)


def test_checkpoint_restores_onto_other_meshes_with_equal_logits(tmp_path):
    cfg = model_config.get("tiny", n_layers=2)
    opt = OptimConfig(peak_lr=1e-3, warmup_steps=0, total_steps=10)
    src_mesh = mesh_lib.make_mesh({"data": 2, "fsdp": 4})
    rules = rules_lib.get_rules("fsdp_tp")
    state, _ = step_lib.init_train_state(cfg, opt, src_mesh, rules, jax.random.key(3))
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=False)
    ck.save(7, state, None, {"phase": 0})
    ck.wait()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    ref = np.asarray(model.forward(cfg, jax.device_get(state.params), tokens))
    for shape, devices in (({"data": 4, "fsdp": 2}, None), ({"fsdp": 4, "tensor": 2}, None),
                           ({"data": 1}, jax.devices()[:1])):
        mesh = mesh_lib.make_mesh(shape, devices=devices)
        abstract = step_lib.abstract_train_state(cfg, opt, mesh, rules)
        restored, meta = ck.restore(7, abstract, None)
        assert meta == {"phase": 0}
        w = restored.params["layers"]["block"]["mlp"]["w1"]
        assert w.sharding.mesh.shape == mesh.shape
        np.testing.assert_array_equal(np.asarray(model.forward(cfg, jax.device_get(restored.params), tokens)), ref)
    ck.close()


def test_injected_nan_batch_is_skipped_and_training_continues(data_cache, tmp_path):
    c = _config(data_cache, "tiny,steps=8,batch=8,seq_len=32,warmup=2,layers=2")
    result = driver.run_experiment(c, str(tmp_path), KINDS, stage_run=faulty(nan_at_steps=[4]))["pretrain"]
    assert result["step"] == 8 and result["skipped_steps"] == 1 and result["rollbacks"] == 0
    logged = {m["step"]: m for m in map(json.loads, open(tmp_path / "metrics.jsonl")) if "pretrain/train/loss" in m}
    assert logged[4]["pretrain/train/nonfinite"] == 1 and logged[4]["pretrain/train/loss"] is None  # NaN -> null
    assert np.isfinite(logged[8]["pretrain/train/loss"])


def test_repeated_bad_steps_roll_back_and_skip_the_data_window(data_cache, tmp_path):
    c = _config(data_cache, "tiny,steps=12,batch=8,seq_len=32,warmup=2,layers=2",
                **{"spike.max_bad_steps": 2, "debug.log_batches": True})
    result = driver.run_experiment(c, str(tmp_path), KINDS, stage_run=faulty(nan_at_steps=[6, 7]))["pretrain"]
    assert result["rollbacks"] == 1 and result["step"] == 12
    # Steps 6 and 7 were bad: rolled back to the step-4 checkpoint and skipped the batches consumed since it, so
    # the steps after the rollback saw batches never seen before.
    batches = [json.loads(line) for line in open(tmp_path / "stages/pretrain/batches.jsonl")]
    indices = [b["step"] for b in batches]
    restart = next(i for i in range(1, len(indices)) if indices[i] <= indices[i - 1])
    first_pass = {b["step"]: b["crc32"] for b in batches[:restart]}
    after = {b["step"]: b["crc32"] for b in batches[restart:]}
    assert min(after) == 4 and max(after) == 11
    assert not set(after.values()) & set(first_pass.values())


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    cfg = model_config.get("tiny", n_layers=1)
    opt = OptimConfig(peak_lr=1e-3, warmup_steps=0, total_steps=10)
    mesh = mesh_lib.make_mesh({"data": 8})
    rules = rules_lib.get_rules("dp")
    state, _ = step_lib.init_train_state(cfg, opt, mesh, rules, jax.random.key(0))
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=False)
    ck.save(4, state, None, {"phase": 0, "tag": "four"})
    ck.save(8, state.replace(step=state.step + 8), None, {"phase": 0, "tag": "eight"})
    ck.wait()
    # Damage step 8 after it was committed: delete the array data of the state item.
    state_dir = tmp_path / "ck/8/state"
    for f in state_dir.rglob("*"):
        if f.is_file() and ("ocdbt" in str(f) or "d/" in str(f.relative_to(state_dir)) or f.suffix == ""):
            f.unlink()
    abstract = step_lib.abstract_train_state(cfg, opt, mesh, rules)
    step, restored, _, meta = ck.restore_latest(abstract, lambda meta: None)
    assert step == 4 and meta["tag"] == "four"
    assert any("could not be restored" in r.getMessage() for r in caplog.records)
    assert list(tmp_path.glob("ck/8.corrupt-*")) and ck.all_steps() == [4]
    ck.close()


def _cli(args, tmp_path):
    return subprocess.run([sys.executable, "-m", "llama_jax.main", *args, f"--workdir={tmp_path}"],
                          capture_output=True, text=True, timeout=300)


def test_config_typo_is_one_clear_error_line(tmp_path):
    r = _cli([f"--config={REPO}/experiments/pretrain.py:tiny", "--config.chekpoint.every_steps=3"], tmp_path)
    assert r.returncode != 0
    assert "chekpoint" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_missing_data_path_is_one_clear_error_line(tmp_path):
    r = _cli([f"--config={REPO}/experiments/pretrain.py:tiny,data=/nonexistent/corpus.jsonl"], tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "llama_jax: error: data source 'user': path '/nonexistent/corpus.jsonl' does not exist" in r.stderr


def test_stage_steps_convert_tokens_exactly():
    st = E.stage("s", [E.phase(4096, 1024, until_tokens=252e6), E.phase(8192, 1024, until_tokens=2.87e12),
                       E.phase(8192, 2048)], E.optim(8e-5, 8000), tokens=int(15.6e12))
    total, bounds = E.stage_steps(st)
    assert bounds[1][0] == 61  # ceil(252e6 / 4,194,304): the first step at which 252M tokens are reached
    assert 61 * 4096 * 1024 >= 252e6 > 60 * 4096 * 1024
    tokens_phase2 = (bounds[2][0] - 61) * 8192 * 1024
    assert 61 * 4096 * 1024 + tokens_phase2 >= 2.87e12
    assert total * 1 > bounds[2][0]
    with pytest.raises(ValueError, match="exactly one of steps"):
        E.stage_steps(E.stage("s", [E.phase(8, 8)], E.optim(1e-3, 1), steps=3, tokens=100))


def test_workdir_is_a_checkpoint_for_generate_and_convert(reference_run, tmp_path):
    from llama_jax.infer import text
    from llama_jax.interop import checkpoints

    assert checkpoints.detect(reference_run) == "workdir"
    cfg, params = checkpoints.load(reference_run)
    assert cfg.n_layers == 2 and cfg.vocab_size == 4096
    ref_params, _ = _final_params(reference_run)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), ref_params)
    completion, gen = text.generate_text(str(reference_run), "def ", max_new_tokens=5)
    assert isinstance(completion, str) and gen.generated_tokens >= 1
    checkpoints.convert(reference_run, tmp_path / "hf", None, "hf")
    cfg_hf, params_hf = checkpoints.load(tmp_path / "hf")
    np.testing.assert_allclose(params_hf["lm_head"], ref_params["lm_head"])
