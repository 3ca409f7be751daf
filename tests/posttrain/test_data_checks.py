"""Post-training data is checked before anything trains and reported honestly: bad bytes and deeply nested
lines are counted malformed records named by line, dialogs dropped as too long are a warning and in DONE.json,
every kind's DONE.json records its data, a round that formed no pairs names the stage that wrote the file, and
the reward model reads a list of preference files."""

import json
import os
import types

import pytest

from llama_jax import experiment
from llama_jax.experiment.options import StageRef
from llama_jax.posttrain import data as data_lib
from llama_jax.stages import KINDS, common
from llama_jax.train import driver, kind as kind_lib
from tests.posttrain import tiny_run


def test_bad_bytes_and_deep_nesting_are_malformed_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path.write_bytes(good.encode() + b"\n" + b'{"messages": "\xff"}\n' + b"[" * 100_000 + b"\n" + good.encode() + b"\n")
    records, report = data_lib.read_jsonl(str(path), "dialog")
    assert len(records) == 2 and report.total == 4 and report.skipped == 2
    assert report.examples[0].startswith("line 2: not UTF-8: byte 0xff") and "line 3: bad JSON: nested too deeply" \
        in report.examples[1]


def _config(tok_path, tmp_path, stages):
    return tiny_run.config(tok_path, tmp_path, stages, max_seq_len=128)


def _dialog(a, words=1):
    return {"messages": [{"role": "user", "content": f"What is {a} + 1?"},
                         {"role": "assistant", "content": " ".join([f"{a} + 1 = {a + 1}"] * words)}]}


def test_a_later_stages_bad_data_stops_the_run_before_anything_trains(tok_path, tmp_path):
    bad = tmp_path / "dialogs.jsonl"
    bad.write_text("not json\n{}\n")
    opt = experiment.optim(1e-3, warmup_steps=1)
    c = _config(tok_path, tmp_path, [experiment.stage("pretrain", [experiment.phase(32, 8)], opt, steps=2),
                                     experiment.stage("sft", [experiment.phase(64, 8)], opt, steps=2, kind="sft",
                                                      options=dict(dialogs=[str(bad)]))])
    with pytest.raises(ValueError, match=r"stage 'sft' \(sft\): .*dialogs.jsonl: no valid dialog records"):
        driver.run_experiment(c, str(tmp_path / "run"), KINDS)
    assert not (tmp_path / "run" / "stages" / "pretrain" / "checkpoints").exists()


def test_dropped_dialogs_are_a_warning_and_in_done(tok_path, tmp_path, caplog):
    dialogs = str(tmp_path / "dialogs.jsonl")
    data_lib.write_jsonl(dialogs, [_dialog(a, words=40 if a % 4 == 0 else 1) for a in range(16)])
    prefs = str(tmp_path / "prefs.jsonl")
    data_lib.write_jsonl(prefs, [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}],
                                  "chosen": f"{a} + 1 = {a + 1}", "rejected": f"{a} + 1 = {a + 2}"} for a in range(8)])
    prefs2 = str(tmp_path / "prefs2.jsonl")
    data_lib.write_jsonl(prefs2, [{"prompt": [{"role": "user", "content": f"What is {a} + 2?"}],
                                   "chosen": f"{a + 2}", "rejected": f"{a + 3}"} for a in range(4)])
    opt = experiment.optim(1e-3, warmup_steps=1)
    c = _config(tok_path, tmp_path, [
        experiment.stage("pretrain", [experiment.phase(32, 8)], opt, steps=1),
        experiment.stage("sft", [experiment.phase(64, 8)], opt, steps=1, kind="sft", options=dict(dialogs=[dialogs])),
        experiment.stage("rm", [experiment.phase(64, 24)], opt, steps=1, kind="reward",
                         options=dict(preferences=[prefs, prefs2])),
        experiment.stage("dpo", [experiment.phase(64, 16)], opt, steps=1, kind="dpo", options=dict(preferences=prefs),
                         )])
    c.stages[3]["options"]["start_from"] = "sft"
    caplog.set_level("WARNING")
    results = driver.run_experiment(c, str(tmp_path / "run"), KINDS)
    sft = results["sft"]["data"]
    assert sft["total"] == sft["kept"] == 16 and sft["too_long"] == 4 and sft["used"] == 12
    assert any("used 12 of 16 records" in r.getMessage()
               and "4 longer than the sequence length" in r.getMessage() for r in caplog.records)
    assert results["rm"]["data"]["total"] == 12 and results["rm"]["data"]["used"] == 12  # both files
    assert results["dpo"]["data"]["used"] == 8


def test_a_round_that_formed_no_pairs_is_named(tmp_path):
    out = tmp_path / "stages" / "pairs_r1"
    out.mkdir(parents=True)
    (out / "preferences.jsonl").write_text("")
    stage = types.SimpleNamespace(name="dpo_r1", kind="dpo")
    ctx = kind_lib.StageContext(stage=stage, config=None, tokenizer=None, mesh=None, rules=None, writer=None,
                                data_cfg={}, to_device=None, eval_step=None, workdir=str(tmp_path))
    with pytest.raises(ValueError, match=r"stage 'dpo_r1': 'stage:pairs_r1/preferences.jsonl', written by stage "
                                         r"'pairs_r1', holds no usable preference record"):
        common.read_records(ctx, StageRef("pairs_r1", "preferences.jsonl"), "preference")
    assert os.path.isfile(out / "preferences.jsonl")
