"""The shared driver's contracts: one data stream across a batch ramp, exact resume at a phase boundary,
refusing a changed config or unreadable checkpoints, intervals, rollback past a bad checkpoint, SIGTERM at
the end of a stage, and loading a workdir whose latest checkpoint is corrupt."""

import json
import os
import pathlib
import shutil
import signal

import jax
import numpy as np
import pytest

from llama_jax import experiment as E
from llama_jax import workdir as workdir_lib
from llama_jax.data import batch as batch_lib
from llama_jax.data import corpus
from llama_jax.data.tokenizer import Tokenizer
from llama_jax.stages import KINDS
from llama_jax.stages.pretrain import Pretrain
from llama_jax.train import driver, kind as kind_lib, stage_run, stream as stream_lib
from tests.train.faults import faulty
from tests.train.helpers import pretrain_config

SMALL = "tiny,steps=4,batch=8,seq_len=32,warmup=1,layers=1"


def _config(data_cache, arg=SMALL, **updates):
    c = pretrain_config(data_cache, arg, checkpoint_every=2, eval_batches=0, max_new_tokens=0, **updates)
    c.checkpoint.keep = 20
    return c


def _ramp(c, steps=6, boundary_step=3):
    """One stage: 8 x 32 tokens per step until step `boundary_step`, then 8 x 64."""
    c.stages = [E.stage("pretrain", [E.phase(32, 8, until_tokens=boundary_step * 256), E.phase(64, 8)],
                        E.optim(1e-3, 1), steps=steps)]
    return c


def _crcs(workdir):
    seen = {}
    for line in open(workdir_lib.batches_path(str(workdir), "pretrain")):
        rec = json.loads(line)
        seen[rec["step"]] = rec["crc32"]  # the last write of each step wins (resumed runs append)
    return [seen[i] for i in sorted(seen)]


def _params(workdir):
    from llama_jax.interop import checkpoints
    return jax.device_get(checkpoints.load(str(workdir))[1])


@pytest.fixture(scope="module")
def finished(data_cache, tmp_path_factory):
    """A finished 4-step run (checkpoints 0, 2, 4)."""
    wd = tmp_path_factory.mktemp("finished")
    driver.run_experiment(_config(data_cache), str(wd), KINDS)
    return wd


@pytest.mark.parametrize("shards", [1, 2])
def test_a_ramped_stage_continues_one_document_stream(data_cache, tmp_path, shards):
    """Each logical data shard (data.hosts) is one document stream continued across the phases."""
    c = _ramp(_config(data_cache))
    (stage,) = E.resolve(c, KINDS)
    assert [(p.first_step, p.seq_len, p.global_batch) for p in stage.phases] == [(0, 32, 8), (3, 64, 8)]
    data_cfg = E.thaw(stage.data) | {"cache_dir": data_cache}
    tok = Tokenizer.from_file(os.path.join(corpus.corpus_dir(data_cache),
                                           f"tokenizer-{corpus.DEFAULT_BPE_RANKS}.model"))
    seen = []

    class Recording(Pretrain):
        def train_iterator(self, ctx, phase, start_documents):
            it = super().train_iterator(ctx, phase, start_documents)

            class Wrapped:
                def __next__(self_inner):
                    b = next(it)
                    seen.append((ctx.data_shard[0], phase, b[batch_lib.DOCUMENT_KEY].copy()))
                    return b
            return Wrapped()

    ctx = kind_lib.StageContext(stage=stage, config=c, tokenizer=tok, mesh=None, rules=None, writer=None,
                               data_cfg=data_cfg, to_device=None, eval_step=None)
    stream = stream_lib.StageStream(Recording(), ctx)
    stream.open(0, num_shards=shards)
    assert stream.iterator.local_shards == list(range(shards))
    for step in range(8):
        batch = stream.next(step)
        assert set(batch) == set(batch_lib.BATCH_KEYS)
    n_sources = 2
    for shard, source in [(k, s) for k in range(shards) for s in range(n_sources)]:
        by_phase = [set(), set()]
        for k, phase, docs in seen:
            ids = docs[docs > 0] - 1
            if k == shard:
                by_phase[phase] |= set((ids[ids % n_sources == source] // n_sources).tolist())
        sizes = len(corpus.load_documents(data_cache, ("code", "prose")[source], "train")[shard::shards])
        assert by_phase[0] and by_phase[1]
        assert max(by_phase[0] | by_phase[1]) < sizes  # the stream has not wrapped yet
        assert not by_phase[0] & by_phase[1]  # no document used in both phases
        assert min(by_phase[1]) == max(by_phase[0]) + 1  # the next phase continues the same order


def test_resume_at_and_just_after_a_phase_boundary_is_bitwise(data_cache, tmp_path):
    c = _ramp(_config(data_cache, **{"checkpoint.every_steps": 1, "debug.log_batches": True}))
    ref = tmp_path / "ref"
    driver.run_experiment(c, str(ref), KINDS)
    ref_params, ref_crcs = _params(ref), _crcs(ref)
    assert len(ref_crcs) == 6
    for resume_at in (3, 4):  # the checkpoint at the boundary, and the first one in the new phase
        wd = tmp_path / f"resume{resume_at}"
        shutil.copytree(ref, wd)
        os.remove(workdir_lib.done_path(str(wd), "pretrain"))
        ckdir = pathlib.Path(workdir_lib.checkpoints_dir(str(wd), "pretrain"))
        for p in ckdir.iterdir():
            if p.name.isdigit() and int(p.name) > resume_at:
                shutil.rmtree(p)
        driver.run_experiment(c, str(wd), KINDS)
        assert _crcs(wd) == ref_crcs
        jax.tree.map(np.testing.assert_array_equal, _params(wd), ref_params)


def test_a_changed_model_config_is_refused_and_never_called_corruption(data_cache, finished, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(finished, wd)
    changed = _config(data_cache, SMALL.replace("layers=1", "layers=2"))
    with pytest.raises(ValueError, match=r"model.n_layers: 1 -> 2.*--allow_config_change"):
        driver.run_experiment(changed, str(wd), KINDS)
    os.remove(workdir_lib.done_path(str(wd), "pretrain"))
    with pytest.raises(ValueError, match="other shapes than the config's model"):
        driver.run_experiment(changed, str(wd), KINDS, allow_config_change=True)
    ckdir = pathlib.Path(workdir_lib.checkpoints_dir(str(wd), "pretrain"))
    assert sorted(p.name for p in ckdir.iterdir()) == ["0", "2", "4"]  # nothing moved aside


def test_config_json_kept_when_the_stage_is_skipped_and_generate_works(data_cache, finished, tmp_path):
    from llama_jax.infer import text
    wd = tmp_path / "wd"
    shutil.copytree(finished, wd)
    before = (wd / "config.json").read_text()
    changed = _config(data_cache, SMALL.replace("layers=1", "layers=2"))
    driver.run_experiment(changed, str(wd), KINDS, allow_config_change=True)  # finished: skipped
    assert (wd / "config.json").read_text() == before
    completion, gen = text.generate_text(str(wd), "def ", max_new_tokens=3)
    assert gen.generated_tokens >= 1


def _damage(checkpoint_dir: pathlib.Path):
    for f in (checkpoint_dir / "state").rglob("*"):
        if f.is_file() and not f.name.startswith("_"):
            f.unlink()


def test_unreadable_checkpoints_are_refused_unless_starting_over(data_cache, finished, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(finished, wd)
    os.remove(workdir_lib.done_path(str(wd), "pretrain"))
    ckdir = pathlib.Path(workdir_lib.checkpoints_dir(str(wd), "pretrain"))
    for step in ("0", "2", "4"):
        _damage(ckdir / step)
    c = _config(data_cache)
    with pytest.raises(ValueError, match=r"none of its checkpoints restores \(.*/4: .*/2: .*/0: .*--start_over"):
        driver.run_experiment(c, str(wd), KINDS)
    assert sorted(p.name for p in ckdir.iterdir()) == ["0", "2", "4"]
    result = driver.run_experiment(c, str(wd), KINDS, start_over=True)["pretrain"]
    assert result["step"] == 4
    assert len(list(ckdir.glob("*.corrupt-*"))) == 3


def test_generate_and_convert_use_the_previous_checkpoint_when_the_latest_is_corrupt(finished, tmp_path):
    from llama_jax.interop import checkpoints
    from llama_jax.train import checkpoint as ckpt_lib
    wd = tmp_path / "wd"
    shutil.copytree(finished, wd)
    ckdir = pathlib.Path(workdir_lib.checkpoints_dir(str(wd), "pretrain"))
    cfg, expected = checkpoints.load(str(finished))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), expected)
    at_2, _ = ckpt_lib.load_params(str(ckdir), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(
            jax.devices()[0])), abstract), step=2)
    _damage(ckdir / "4")
    _, params = checkpoints.load(str(wd))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(at_2))
    checkpoints.convert(str(wd), str(tmp_path / "hf"), None, "hf")
    assert (tmp_path / "hf" / "config.json").exists()


def test_intervals_are_validated_and_zero_means_never(data_cache, tmp_path):
    c = _config(data_cache, "tiny,steps=3,batch=8,seq_len=32,warmup=1,layers=1",
                **{"checkpoint.every_steps": 0, "log_every_steps": 0})
    result = driver.run_experiment(c, str(tmp_path / "zero"), KINDS)["pretrain"]
    assert result["step"] == 3
    ckdir = pathlib.Path(workdir_lib.checkpoints_dir(str(tmp_path / "zero"), "pretrain"))
    assert sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) == [0, 3]  # start and end only
    logged = [m["step"] for m in map(json.loads, open(tmp_path / "zero/metrics.jsonl"))
              if "pretrain/train/loss" in m]
    assert logged == [3]  # only the stage's last step
    for key, value, match in (("checkpoint.every_steps", -1, "no periodic checkpoints"),
                              ("log_every_steps", -5, "no periodic metrics"),
                              ("spike.window", 0, r"spike.window=0 must be an integer >= 1")):
        with pytest.raises(ValueError, match=match):
            driver.run_experiment(_config(data_cache, **{key: value}), str(tmp_path / "bad"), KINDS)
    assert not (tmp_path / "bad" / "stages").exists()  # refused before any work


def test_rollback_walks_back_past_a_checkpoint_that_reproduces_the_fault(data_cache, tmp_path):
    c = _config(data_cache, "tiny,steps=10,batch=8,seq_len=32,warmup=1,layers=1",
                **{"checkpoint.every_steps": 4, "spike.max_bad_steps": 2})
    result = driver.run_experiment(c, str(tmp_path), KINDS, stage_run=faulty(nan_at_steps=[9, 10],
                                                                            nan_params_in_checkpoints=[8]))["pretrain"]
    # Steps 9, 10 bad -> back to 8 (NaN params: the fault again) -> back past it to 4 -> clean to the end.
    assert result["step"] == 10 and result["rollbacks"] == 2
    rollbacks = [m for m in map(json.loads, open(tmp_path / "metrics.jsonl")) if "pretrain/rollback" in m]
    assert [r["pretrain/rollback"].split(";")[0] for r in rollbacks] == ["rolled back to step 8",
                                                                         "rolled back to step 4"]
    assert np.isfinite(jax.tree.leaves(_params(tmp_path))[0]).all()


def test_sigterm_during_the_final_samples_stops_before_the_next_stage(data_cache, tmp_path, monkeypatch):
    from llama_jax.infer import sampling
    c = _config(data_cache, "tiny,steps=2,batch=8,seq_len=32,warmup=1,layers=1,stages=2")
    c.sample.max_new_tokens = 2
    real = sampling.generate

    def generate_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", generate_then_sigterm)
    with pytest.raises(stage_run.Preempted, match="stage 'pretrain'"):
        driver.run_experiment(c, str(tmp_path), KINDS)
    assert workdir_lib.read_done(str(tmp_path), "pretrain")["step"] == 2
    assert not os.path.exists(workdir_lib.stage_dir(str(tmp_path), "long_context"))
