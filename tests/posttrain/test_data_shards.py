"""The post-training train iterators read the driver's logical data shards (`llama_jax.data.hosts`): the global
batch does not depend on the process count, a stage restarts on another process count exactly, and every
record's rows stay together in any batch, micro-batch or concatenation of shards."""
import dataclasses
import types

import numpy as np
import pytest

from llama_jax import experiment
from llama_jax.data import hosts
from llama_jax.posttrain import data as data_lib
from llama_jax.stages import KINDS, common
from llama_jax.train import kind as kind_lib

SHARDS = 4


def _ctx(tmp_path, tok, tiny_cfg, kind, global_batch, grad_accum=1):
    prefs = str(tmp_path / "prefs.jsonl")
    data_lib.write_jsonl(prefs, [{"prompt": [{"role": "user", "content": f"What is {a} + 1?"}],
                                  "chosen": f"{a} + 1 = {a + 1}", "rejected": f"{a} + 1 = {a + 2}",
                                  **({"edited": f"{a + 1}"} if a % 3 == 0 else {})} for a in range(21)])
    dialogs = str(tmp_path / "dialogs.jsonl")
    data_lib.write_jsonl(dialogs, [{"messages": [{"role": "user", "content": f"What is {a} + 2?"},
                                                 {"role": "assistant", "content": f"{a} + 2 = {a + 2}"}]}
                                   for a in range(40)])
    opts = {"preferences": prefs} if kind.name != "sft" else {"dialogs": dialogs}
    stage = types.SimpleNamespace(name=f"{kind.name}-{global_batch}-{grad_accum}", kind=kind.name, model=tiny_cfg,
                                  options=kind.parse_options("s", opts), grad_accum=grad_accum,
                                  phases=(experiment.Phase(0, 32, global_batch),), iterator_seed=lambda: 11,
                                  init_source="scratch")
    return kind_lib.StageContext(stage=stage, config=None, tokenizer=tok, mesh=None, rules=None,
                                 writer=types.SimpleNamespace(write_text=lambda *a: None), data_cfg={},
                                 to_device=None, eval_step=None, workdir=str(tmp_path))


def _process_iterators(ctx, kind, processes):
    def factory(shard, shards):
        return kind.train_iterator(dataclasses.replace(ctx, data_shard=(shard, shards)), 0, {})
    return [hosts.ShardedTrainIterator(factory, SHARDS, ctx.stage.phases[0].global_batch, p, processes)
            for p in range(processes)]


def _global_batch(iterators):
    return hosts.concat_rows([next(it) for it in iterators])


@pytest.mark.parametrize("kind,global_batch", [(KINDS["sft"], 8), (KINDS["reward"], 24)])
def test_global_batch_and_restart_do_not_depend_on_the_process_count(tmp_path, tok, tiny_cfg, kind, global_batch):
    ctx = _ctx(tmp_path, tok, tiny_cfg, kind, global_batch)
    one = _process_iterators(ctx, kind, 1)
    reference = [_global_batch(one) for _ in range(4)]
    assert reference[0]["inputs"].shape == (global_batch, 32)
    two = _process_iterators(ctx, kind, 2)
    for want in reference[:2]:
        got = _global_batch(two)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    # restart the stream on 4 processes from the 2 processes' gathered state
    state = {"num_shards": SHARDS, "shards": {k: v for it in two for k, v in it.get_state()["shards"].items()}}
    four = _process_iterators(ctx, kind, 4)
    for it in four:
        it.set_state(state)
    for want in reference[2:]:
        got = _global_batch(four)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(hosts.ReshardError, match="4 data shards cannot be split among 3 processes"):
        _process_iterators(ctx, kind, 3)


def test_records_stay_together_across_shards_and_micro_batches(tmp_path, tok, tiny_cfg):
    kind = KINDS["reward"]
    for grad_accum in (1, 2):
        ctx = _ctx(tmp_path, tok, tiny_cfg, kind, 24 * grad_accum, grad_accum)
        batch = _global_batch(_process_iterators(ctx, kind, 2))
        micro = [{k: v[i::grad_accum] for k, v in batch.items()} for i in range(grad_accum)]  # the driver's split
        records = 0
        for b in micro:
            chosen, rejected, edited = common.split_roles(b["inputs"], 3)
            for c, r, e in zip(chosen, rejected, edited):
                cq, rq = tok.decode(c[c > 0].tolist()), tok.decode(r[r > 0].tolist())
                question = cq.split("What is ")[1].split("?")[0]
                assert question in rq and cq != rq  # one record's chosen and rejected
                a = int(question.split(" + ")[0])
                assert (e > 0).any() == (a % 3 == 0)  # its edited row (padding when it has none)
                records += 1
        assert records == 8 * grad_accum
    with pytest.raises(ValueError, match="rows per data shard must hold 3 roles x a multiple of grad_accum=2"):
        _process_iterators(_ctx(tmp_path, tok, tiny_cfg, kind, 12, 2), kind, 1)


def test_a_stage_whose_records_all_exceed_the_sequence_length_is_refused(tmp_path, tok, tiny_cfg):
    for kind, message in ((KINDS["sft"], r"every dialog of .*dialogs.jsonl' is longer than the sequence length 6"),
                          (KINDS["reward"], r"no preference record of .*prefs.jsonl' fits the sequence length 6")):
        ctx = _ctx(tmp_path, tok, tiny_cfg, kind, 6)
        ctx.stage.phases = (experiment.Phase(0, 6, 6),)
        with pytest.raises(ValueError, match=message):
            kind.train_iterator(ctx, 0, {})
