"""The driver's reliability guarantees beyond exact resume: one writer per workdir, a first attempt that trained
nothing does not pin its config, a finished workdir gets its config.json back, the anneal's averaged checkpoint
survives a crash before DONE.json, checksums as soon as an async save commits, and bad settings or records named
in one line."""

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from llama_jax import experiment as E
from llama_jax import workdir as workdir_lib
from llama_jax.stages import KINDS
from llama_jax.train import checkpoint as ckpt_lib
from llama_jax.train import driver
from tests.train.helpers import REPO, pretrain_config
from tests.train.test_checkpoint import _state

SMALL = "tiny,steps=2,batch=8,seq_len=32,warmup=1,layers=1"


def _config(data_cache, arg=SMALL, **updates):
    return pretrain_config(data_cache, arg, checkpoint_every=1, eval_batches=0, max_new_tokens=0, **updates)


def _hold(workdir, ready, release):
    with workdir_lib.WorkdirLock(workdir):
        ready.set()
        release.wait(60)


def test_a_second_run_on_a_live_workdir_is_refused_and_a_killed_holder_leaves_no_stale_lock(data_cache, tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), ready, release))
    holder.start()
    try:
        assert ready.wait(60)
        with pytest.raises(workdir_lib.WorkdirBusy, match=rf"in use by another run \(host .*, pid {holder.pid}, since"):
            driver.run_experiment(_config(data_cache), str(tmp_path), KINDS)
        assert not (tmp_path / "stages").exists() and not (tmp_path / "config.json").exists()  # nothing touched
    finally:
        holder.kill()  # SIGKILL: the kernel drops its flock
        holder.join()
    result = driver.run_experiment(_config(data_cache), str(tmp_path), KINDS)
    assert result["pretrain"]["step"] == 2


def test_a_failed_first_attempt_does_not_pin_its_config(data_cache, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\xff\xfe not text\n")
    c = _config(data_cache)
    c.data.sources = [dict(name="mine", kind="jsonl", path=str(bad), weight=1.0, split="all", eval_split="all")]
    with pytest.raises(ValueError, match="bad.jsonl"):
        driver.run_experiment(c, str(tmp_path / "run"), KINDS)
    assert (tmp_path / "run" / "config.json").exists()  # written before the data was read
    result = driver.run_experiment(_config(data_cache), str(tmp_path / "run"), KINDS)  # the corrected config
    assert result["pretrain"]["step"] == 2
    trained = _config(data_cache, SMALL.replace("steps=2", "steps=3"))
    with pytest.raises(ValueError, match="the config differs from the one workdir"):  # now it has trained
        driver.run_experiment(trained, str(tmp_path / "run"), KINDS)


def test_a_finished_workdir_that_lost_its_config_gets_it_back(data_cache, tmp_path):
    c = _config(data_cache)
    driver.run_experiment(c, str(tmp_path), KINDS)
    os.remove(tmp_path / "config.json")
    again = driver.run_experiment(c, str(tmp_path), KINDS)  # every stage finished: skipped
    assert again["pretrain"]["step"] == 2
    assert workdir_lib.config_differences(workdir_lib.read_config(str(tmp_path)), c) == []
    from llama_jax.interop import checkpoints
    checkpoints.load(str(tmp_path))  # what generate / convert read


def test_a_garbage_done_file_is_named(data_cache, tmp_path):
    c = _config(data_cache)
    driver.run_experiment(c, str(tmp_path), KINDS)
    done = tmp_path / "stages" / "pretrain" / "DONE.json"
    done.write_text("{not json")
    with pytest.raises(ValueError, match=r"DONE.json is not a stage's record \(invalid JSON"):
        driver.run_experiment(c, str(tmp_path), KINDS)


def test_the_averaged_anneal_checkpoint_survives_a_crash_before_done(data_cache, tmp_path, monkeypatch, caplog):
    c = _config(data_cache)
    c.stages = [E.stage("pretrain", [E.phase(32, 8)], E.optim(1e-3, 1), steps=2),
                E.stage("anneal", [E.phase(32, 8)], E.optim(1e-3, 0, decay="linear", final_lr_ratio=0.0), steps=2,
                        kind="anneal", options=dict(average_last=2))]
    real = workdir_lib.write_json_atomic

    def crash_on_done(path, obj):
        if path.endswith(os.path.join("anneal", workdir_lib.DONE)):
            raise KeyboardInterrupt("killed between the averaged checkpoint and DONE.json")
        return real(path, obj)

    monkeypatch.setattr(workdir_lib, "write_json_atomic", crash_on_done)
    with pytest.raises(KeyboardInterrupt):
        driver.run_experiment(c, str(tmp_path), KINDS)
    monkeypatch.setattr(workdir_lib, "write_json_atomic", real)
    averaged = tmp_path / "stages" / "anneal" / "checkpoints" / "3"
    assert averaged.is_dir()
    written = averaged.stat().st_mtime_ns
    caplog.set_level("WARNING")
    result = driver.run_experiment(c, str(tmp_path), KINDS)["anneal"]
    assert result["averaged_checkpoint"] == 3 and result["averaged_steps"] == [1, 2]
    assert averaged.stat().st_mtime_ns == written  # kept, not re-written
    assert not list((tmp_path / "stages" / "anneal" / "checkpoints").glob("*.corrupt-*"))
    assert not [r for r in caplog.records if "could not be restored" in r.getMessage()]


def test_checksums_are_written_when_an_async_save_commits(tmp_path):
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=True)
    ck.save(4, _state(4.0), None, {"phase": 0})
    checksums = tmp_path / "ck" / "4" / ckpt_lib.CHECKSUM_FILE
    deadline = time.monotonic() + 60
    while not checksums.exists() and time.monotonic() < deadline:  # no wait(), no next save
        time.sleep(0.05)
    assert checksums.exists()
    assert ck.verify(4)
    assert json.loads(checksums.read_text())
    ck.close()


@pytest.mark.parametrize("optim,message", [
    (dict(peak_lr=-1.0), r"peak_lr > 0"),
    (dict(peak_lr=1e-3, warmup_steps=-2), r"warmup_steps >= 0"),
    (dict(peak_lr=1e-3, final_lr_ratio=2.0), r"final_lr_ratio in \[0, 1\]"),
])
def test_bad_optimizer_settings_are_refused_when_resolved(data_cache, optim, message):
    c = _config(data_cache)
    c.stages[0]["optim"].update(optim)
    with pytest.raises(ValueError, match=rf"stage 'pretrain': optim needs .*{message}"):
        E.resolve(c, KINDS)


def test_a_failed_async_save_is_one_error_and_the_run_exits_at_once(tmp_path, monkeypatch):
    ck = ckpt_lib.StageCheckpoints(str(tmp_path / "ck"), async_save=True)
    ck.save(4, _state(4.0), None, {"phase": 0})
    ck.wait()
    real = type(ck._manager).wait_until_finished

    def full_disk(self):
        real(self)
        raise ValueError("RESOURCE_EXHAUSTED: Error writing \"params.w/0.0\" in OCDBT database ... Failed to write "
                         "11821056 bytes to file 9: No space left on device [os_error_code='28']")

    ck.save(8, _state(8.0), None, {"phase": 0})
    monkeypatch.setattr(type(ck._manager), "wait_until_finished", full_disk)  # the save in flight fails
    with pytest.raises(ckpt_lib.CheckpointSaveError,
                       match=r"^checkpoint step 8 could not be saved in .*/ck: no space left on device$"):
        ck.wait()
    ck.close()  # after a failed save: returns, no second error

    # the entry point prints one line and exits at once, although a background thread would hold the exit
    code = ("import threading, time\n"
            "from llama_jax import cli\n"
            "def main():\n"
            "    threading.Thread(target=time.sleep, args=(600,)).start()\n"
            "    raise OSError(28, 'No space left on device')\n"
            "cli.run(main)\n")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 2 and out.stderr.strip() == "llama_jax: error: No space left on device", out.stderr
    assert time.monotonic() - started < 60
