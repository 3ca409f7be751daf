"""Logical data shards: the global batch does not depend on the process count, and a data state saved by P
processes restores on P' processes."""

import numpy as np
import pytest

from llama_jax.data import hosts, pipeline

SEQ, BATCH = 32, 8


def _iterators(cfg, tok, shards, processes):
    return [hosts.make_train_iterator(cfg, tok, SEQ, BATCH, seed=3, num_shards=shards, process_index=p,
                                      process_count=processes) for p in range(processes)]


def _global(iterators):
    parts = [next(it) for it in iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def test_global_batch_is_independent_of_the_process_count(corpus_cache, default_tokenizer):
    cfg = pipeline.embedded_corpus_config(corpus_cache)
    one, two = (_iterators(cfg, default_tokenizer, 2, n) for n in (1, 2))
    for _ in range(2):
        a, b = _global(one), _global(two)
        assert a["inputs"].shape == (BATCH, SEQ)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # Shard k is exactly the pipeline's process k of 2: every process reads only its own documents.
    direct = pipeline.make_train_iterator(cfg, default_tokenizer, SEQ, BATCH, 3, process_index=1, process_count=2)
    rows = np.concatenate([next(direct)["inputs"] for _ in range(2)])
    shard = hosts.make_train_iterator(cfg, default_tokenizer, SEQ, BATCH, 3, num_shards=2, process_index=1,
                                      process_count=2)
    np.testing.assert_array_equal(rows, np.concatenate([next(shard)["inputs"] for _ in range(2)]))


def test_state_of_two_processes_restores_on_one(corpus_cache, default_tokenizer):
    cfg = pipeline.embedded_corpus_config(corpus_cache)
    two = _iterators(cfg, default_tokenizer, 2, 2)
    for _ in range(2):
        _global(two)
    saved = {"num_shards": 2, "shards": {}}
    for it in two:  # what global_state() gathers across processes
        saved["shards"].update(it.get_state()["shards"])
    expected = _global(two)
    (one,) = _iterators(cfg, default_tokenizer, 0, 1)  # 0 = one shard per process: rebuilt to the saved 2
    assert one.num_shards == 1
    one.set_state(saved)
    assert one.num_shards == 2 and one.local_shards == [0, 1]
    got = next(one)
    for k in expected:
        np.testing.assert_array_equal(got[k], expected[k])


def test_process_count_that_cannot_split_the_shards_is_a_clear_error(corpus_cache, default_tokenizer):
    cfg = pipeline.embedded_corpus_config(corpus_cache)
    (it,) = [hosts.make_train_iterator(cfg, default_tokenizer, SEQ, 6, 0, num_shards=0, process_index=0,
                                       process_count=3)]
    with pytest.raises(hosts.ReshardError, match="2 data shards cannot be split among 3 processes"):
        it.set_state({"num_shards": 2, "shards": {"0": {}, "1": {}}})
    with pytest.raises(ValueError, match="global batch 6 is not divisible by the 4 data shards"):
        hosts.make_train_iterator(cfg, default_tokenizer, SEQ, 6, 0, num_shards=4, process_index=0, process_count=1)
