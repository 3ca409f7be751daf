"""Grain pipeline: batch contract, packing, mixing, per-process shards, checkpointed resume, errors."""
import json
import random

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.data import pipeline

SEQ_LEN = 64


def _write_jsonl(path, texts, key="text"):
    with open(path, "w") as f:
        for t in texts:
            f.write(json.dumps({key: t, "other": 1}) + "\n")
    return str(path)


def _docs(n, seed=0, prefix="doc"):
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "def", "return", "(", ")", "12", "é", "🙂", "\n", "    "]
    # Lengths from a handful of tokens to several rows, so documents are split across rows.
    return [f"{prefix}{i} " + " ".join(rng.choice(words) for _ in range(rng.choice([1, 5, 20, 60, 250]))) for i in range(n)]


def _expected_stream(tok, texts):
    inputs, targets = [], []
    for t in texts:
        d = tok.encode(t, bos=True, eos=True, disallowed_special=())
        inputs += d[:-1]
        targets += d[1:]
    return inputs, targets


def _real_stream(batches):
    inputs, targets = [], []
    for b in batches:
        for row in range(b["inputs"].shape[0]):
            real = b["loss_mask"][row] == 1
            inputs += b["inputs"][row][real].tolist()
            targets += b["targets"][row][real].tolist()
    return inputs, targets


def _check_row_structure(batch, bos_id):
    assert set(batch) == set(pipeline.BATCH_KEYS)
    for key, value in batch.items():
        assert value.dtype == np.int32 and value.shape == batch["inputs"].shape, key
    for row in range(batch["inputs"].shape[0]):
        seg, pos = batch["segment_ids"][row], batch["positions"][row]
        inp, tgt, mask = batch["inputs"][row], batch["targets"][row], batch["loss_mask"][row]
        np.testing.assert_array_equal(mask, (seg > 0).astype(np.int32))
        n_real = int(mask.sum())
        assert np.all(mask[:n_real] == 1) and np.all(mask[n_real:] == 0)  # padding only at the end
        assert np.all(inp[n_real:] == 0) and np.all(pos[n_real:] == 0)
        if n_real:
            assert seg[0] == 1 and pos[0] == 0
        for j in range(1, n_real):
            if seg[j] == seg[j - 1]:  # same document: consecutive positions, targets feed the next input
                assert pos[j] == pos[j - 1] + 1 and inp[j] == tgt[j - 1] and inp[j] != bos_id
            else:  # a new document (or piece) starts: new segment, positions restart
                assert seg[j] == seg[j - 1] + 1 and pos[j] == 0
        starts = np.flatnonzero(inp[:n_real] == bos_id)
        assert np.all(pos[starts] == 0)


def _eval_cfg(path, **extra):
    return {"sources": [dict(name="src", kind="jsonl", path=path, split="all", eval_split="all", **extra)]}


def test_packing_conserves_tokens_and_separates_documents(small_tokenizer, tmp_path):
    tok = small_tokenizer
    texts = _docs(80)
    cfg = _eval_cfg(_write_jsonl(tmp_path / "d.jsonl", texts))
    batches = list(pipeline.make_eval_iterator(cfg, tok, SEQ_LEN, 4, process_index=0, process_count=1))
    for b in batches:
        _check_row_structure(b, tok.bos_id)
    assert _real_stream(batches) == _expected_stream(tok, texts)
    n_bos = sum(int(((b["inputs"] == tok.bos_id) & (b["loss_mask"] == 1)).sum()) for b in batches)
    assert n_bos == len(texts)
    # Some document is longer than a row, so it must appear as several pieces.
    assert max(len(tok.encode(t)) for t in texts) > 2 * SEQ_LEN


def test_eval_iterator_fixed_number_of_batches(small_tokenizer, tmp_path):
    cfg = _eval_cfg(_write_jsonl(tmp_path / "d.jsonl", _docs(3)))
    batches = list(pipeline.make_eval_iterator(cfg, small_tokenizer, SEQ_LEN, 4, 0, 1, num_batches=5))
    assert len(batches) == 5
    assert all(b["inputs"].shape == (4, SEQ_LEN) for b in batches)
    assert batches[-1]["loss_mask"].sum() == 0


def test_text_and_array_record_sources(small_tokenizer, tmp_path):
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    texts = _docs(12, seed=3)
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i, t in enumerate(texts):
        (text_dir / f"{i:03d}.txt").write_text(t)
    ar_path = str(tmp_path / "docs.array_record")
    writer = array_record_module.ArrayRecordWriter(ar_path, "group_size:1")
    for t in texts:
        writer.write(json.dumps({"body": t}).encode())
    writer.close()
    for source in [
        dict(name="t", kind="text", path=str(text_dir), split="all", eval_split="all"),
        dict(name="ar", kind="array_record", path=ar_path, split="all", eval_split="all", text_key="body"),
    ]:
        batches = list(pipeline.make_eval_iterator({"sources": [source]}, small_tokenizer, SEQ_LEN, 2, 0, 1))
        assert _real_stream(batches) == _expected_stream(small_tokenizer, texts), source["kind"]


def test_directory_and_glob_read_each_file_by_its_kind(small_tokenizer, tmp_path):
    texts = _docs(9, seed=6)
    folder = tmp_path / "mixed"
    (folder / "sub").mkdir(parents=True)
    _write_jsonl(folder / "a.jsonl", texts[:4])
    _write_jsonl(folder / "sub/b.jsonl", texts[4:8])
    (folder / "z.txt").write_text(texts[8])  # read in sorted path order: a, sub/b, z
    want = _expected_stream(small_tokenizer, texts)
    for path in (str(folder), str(folder / "**/*")):
        source = dict(name="d", kind="text", path=path, split="all", eval_split="all")
        batches = list(pipeline.make_eval_iterator({"sources": [source]}, small_tokenizer, SEQ_LEN, 2, 0, 1))
        assert _real_stream(batches) == want, path  # documents, not the raw JSON lines


def test_malformed_records_are_counted_and_reported_in_one_line(small_tokenizer, tmp_path):
    good = json.dumps({"text": "fine"})
    lines = [good.encode(), b'{"text": null}', b'{"text": 7}', b'{"text": "caf\\u00e9 ok"}', b'{"text": "bad \xff"}',
             b'{"txt": "x"}', b"{not json", good.encode()]
    (tmp_path / "d.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "latin1.txt").write_bytes("naïve".encode("latin-1"))

    def read(source):
        return pipeline.make_eval_iterator({"sources": [dict(name="m", split="all", eval_split="all", **source)]},
                                           small_tokenizer, SEQ_LEN, 2, 0, 1)

    with pytest.raises(ValueError) as err:
        read(dict(kind="jsonl", path=str(tmp_path / "d.jsonl")))
    message = str(err.value)
    assert "\n" not in message and "'m': 5 malformed records" in message, message
    assert "d.jsonl:2: text 'text' is null, not a string" in message and "d.jsonl:3: text 'text' is int" in message
    assert "d.jsonl:5: invalid UTF-8 at byte" in message
    with pytest.raises(ValueError, match=r"1 malformed record: .*latin1\.txt: invalid UTF-8 at byte 2"):
        read(dict(kind="text", path=str(tmp_path / "latin1.txt")))


def test_array_record_with_invalid_utf8_or_null_text_is_named(small_tokenizer, tmp_path):
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel

    for name, record in [("utf8", b"ok \xff"), ("null", json.dumps({"body": None}).encode())]:
        path = str(tmp_path / f"{name}.array_record")
        writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
        writer.write(json.dumps({"body": "fine"}).encode() if name == "null" else b"fine")
        writer.write(record)
        writer.close()
        source = dict(name=name, kind="array_record", path=path, split="all", eval_split="all",
                      text_key="body" if name == "null" else None)
        with pytest.raises(ValueError, match=rf"'{name}': malformed record 1: "
                                             rf"({'invalid UTF-8' if name == 'utf8' else 'text .body. is null'})"):
            list(pipeline.make_eval_iterator({"sources": [source]}, small_tokenizer, SEQ_LEN, 2, 0, 1))


def test_two_processes_read_disjoint_shards_covering_everything(small_tokenizer, tmp_path):
    texts = _docs(41, seed=1)
    cfg = _eval_cfg(_write_jsonl(tmp_path / "d.jsonl", texts))
    streams = [
        _real_stream(pipeline.make_eval_iterator(cfg, small_tokenizer, SEQ_LEN, 4, process_index=p, process_count=2))
        for p in range(2)
    ]
    for p in range(2):
        assert streams[p] == _expected_stream(small_tokenizer, texts[p::2])
    # Training iterators: each process yields its half of the global batch from its own shard only.
    train_cfg = {"sources": [dict(name="src", kind="jsonl", path=cfg["sources"][0]["path"], split="all")]}
    shard_ids = [set(_expected_stream(small_tokenizer, texts[p::2])[0]) for p in range(2)]
    prefixes = [{t.split(" ")[0] for t in texts[p::2]} for p in range(2)]
    for p in range(2):
        it = pipeline.make_train_iterator(train_cfg, small_tokenizer, SEQ_LEN, 8, seed=0, process_index=p, process_count=2)
        seen = set()
        for _ in range(30):
            b = next(it)
            assert b["inputs"].shape == (4, SEQ_LEN)
            _check_row_structure(b, small_tokenizer.bos_id)
            for row in range(4):
                real = b["inputs"][row][b["loss_mask"][row] == 1]
                assert set(real.tolist()) <= shard_ids[p]
                starts = np.flatnonzero(real == small_tokenizer.bos_id)
                for s in starts:
                    words = small_tokenizer.decode(real[s + 1 : s + 12].tolist()).split(" ")
                    if len(words) > 1:  # the "docN" name is complete
                        seen.add(words[0])
        assert len(seen) > 5 and seen <= prefixes[p]


def test_mixture_proportions_follow_weights(small_tokenizer, tmp_path):
    a = _write_jsonl(tmp_path / "a.jsonl", [("alpha " * 40).strip()] * 20)
    b = _write_jsonl(tmp_path / "b.jsonl", [("omega? " * 40).strip()] * 20)
    cfg = ml_collections.ConfigDict(
        {
            "sources": [
                dict(name="a", kind="jsonl", path=a, split="all", weight=0.8),
                dict(name="b", kind="jsonl", path=b, split="all", weight=0.2),
            ]
        }
    )
    a_ids = set(small_tokenizer.encode("alpha alpha")) - set(small_tokenizer.encode("omega? omega?"))
    assert a_ids
    it = pipeline.make_train_iterator(cfg, small_tokenizer, 32, 8, seed=3, process_index=0, process_count=1)
    rows_a = rows = 0
    for _ in range(50):
        batch = next(it)
        for row in batch["inputs"]:
            rows += 1
            rows_a += bool(a_ids & set(row.tolist()))
    assert abs(rows_a / rows - 0.8) < 0.03, rows_a / rows


def test_resume_from_state_continues_exactly(small_tokenizer, tmp_path):
    cfg = {
        "sources": [
            dict(name="a", kind="jsonl", path=_write_jsonl(tmp_path / "a.jsonl", _docs(30, 4, "a")), weight=2.0, split="all"),
            dict(name="b", kind="jsonl", path=_write_jsonl(tmp_path / "b.jsonl", _docs(30, 5, "b")), weight=1.0, split="all"),
        ]
    }

    def make():
        return pipeline.make_train_iterator(cfg, small_tokenizer, SEQ_LEN, 4, seed=7, process_index=0, process_count=1)

    it = make()
    for _ in range(13):  # past one epoch of the smaller shard, so reshuffling and packing state matter
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    expected = [next(it) for _ in range(6)]
    resumed = make()
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(6)]):
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(want[key], got[key])
    # Through Orbax as a JSON item, as the training checkpoint stores it (train/checkpoint.py, data/hosts.py).
    it = make()
    for _ in range(13):
        next(it)
    manager = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    manager.save(13, args=ocp.args.Composite(data=ocp.args.JsonSave(it.get_state())))
    manager.wait_until_finished()
    restored = make()
    restored.set_state(manager.restore(13, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"])
    np.testing.assert_array_equal(next(restored)["inputs"], expected[0]["inputs"])
    manager.close()


def _boundary_states(state) -> int:
    """How many packers in an iterator state stand at a document boundary (no partly used document)."""
    if isinstance(state, dict):
        here = int(all(tuple(v) == (-1, -1) for v in state["remainder_slices"].values())
                   if "remainder_slices" in state else 0)
        return here + sum(_boundary_states(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_boundary_states(v) for v in state)
    return 0


def test_resume_after_json_round_trip_at_every_step_including_step_0(small_tokenizer, tmp_path):
    # Documents of 4, 8 or 12 tokens, so that rows of 16 often end exactly at a document
    # boundary; the state at step 0 always does.
    rng = random.Random(3)
    candidates = [f"d{j} " + " ".join(rng.choice(["x", "yy", "def"]) for _ in range(rng.choice([0, 1, 2, 3, 9])))
                  for j in range(400)]
    lengths = {t: len(small_tokenizer.encode(t, bos=True, eos=True)) - 1 for t in candidates}
    docs = [t for t in candidates if lengths[t] in (4, 8, 12)][:40]
    sources = [dict(name="s", kind="jsonl", path=_write_jsonl(tmp_path / "s.jsonl", docs), split="all")]

    def make():
        return pipeline.make_train_iterator({"sources": sources}, small_tokenizer, 16, 2, seed=5,
                                            process_index=0, process_count=1)

    it = make()
    boundaries = []
    for step in range(8):
        state = it.get_state()
        boundaries.append(_boundary_states(state))
        resumed = make()
        resumed.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
        want, got = next(it), next(resumed)
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(want[key], got[key], err_msg=f"step {step} {key}")
    assert boundaries[0] == 1 and any(boundaries[1:]), boundaries  # a boundary after step 0 too
    assert not all(boundaries[1:]), boundaries  # and a partly used document


def test_same_seed_same_batches_and_seed_changes_order(small_tokenizer, tmp_path):
    cfg = {"sources": [dict(name="a", kind="jsonl", path=_write_jsonl(tmp_path / "a.jsonl", _docs(40)), split="all")]}

    def first(seed):
        return next(pipeline.make_train_iterator(cfg, small_tokenizer, SEQ_LEN, 4, seed=seed, process_index=0, process_count=1))

    np.testing.assert_array_equal(first(1)["inputs"], first(1)["inputs"])
    assert not np.array_equal(first(1)["inputs"], first(2)["inputs"])


def test_embedded_corpus_pipeline(default_tokenizer, corpus_cache):
    cfg = pipeline.embedded_corpus_config(corpus_cache)
    it = pipeline.make_train_iterator(cfg, default_tokenizer, 128, 8, seed=0, process_index=0, process_count=1)
    batch = next(it)
    _check_row_structure(batch, default_tokenizer.bos_id)
    assert batch["inputs"].max() < 4096 and batch["loss_mask"].all()
    val = pipeline.make_eval_iterator(cfg, default_tokenizer, 128, 8, process_index=0, process_count=1, num_batches=2)
    assert [b["inputs"].shape for b in val] == [(8, 128), (8, 128)]


def test_global_batch_from_process_local_data(small_tokenizer, tmp_path):
    cfg = _eval_cfg(_write_jsonl(tmp_path / "d.jsonl", _docs(10)))
    local = next(pipeline.make_eval_iterator(cfg, small_tokenizer, SEQ_LEN, 8, process_index=0, process_count=1))
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "fsdp"))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    batch = pipeline.make_global_batch(local, sharding)
    for key in pipeline.BATCH_KEYS:
        assert batch[key].shape == (8, SEQ_LEN) and batch[key].sharding == sharding
        np.testing.assert_array_equal(np.asarray(batch[key]), local[key])


def test_bad_configs_raise_naming_the_problem(small_tokenizer, tmp_path):
    tok = small_tokenizer
    good = _write_jsonl(tmp_path / "g.jsonl", _docs(5))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")

    def train(sources, **kw):
        return pipeline.make_train_iterator({"sources": sources}, tok, SEQ_LEN, kw.pop("batch", 4), 0, 0, 1)

    with pytest.raises(FileNotFoundError, match="nothere.jsonl"):
        train([dict(name="x", kind="jsonl", path=str(tmp_path / "nothere.jsonl"))])
    with pytest.raises(ValueError, match="'e'.*no documents"):
        train([dict(name="e", kind="jsonl", path=str(empty), split="all")])
    with pytest.raises(ValueError, match="'n'.*weight"):
        train([dict(name="n", kind="jsonl", path=good, weight=-1.0)])
    with pytest.raises(ValueError, match="all data source weights are zero"):
        train([dict(name="z", kind="jsonl", path=good, weight=0.0)])
    with pytest.raises(ValueError, match="'w'.*weight"):
        train([dict(name="w", kind="jsonl", path=good, weight=float("nan"))])
    with pytest.raises(ValueError, match="'parquet'"):
        train([dict(name="p", kind="parquet", path=good)])
    with pytest.raises(ValueError, match="wieght"):
        train([dict(name="t", kind="jsonl", path=good, wieght=1.0)])
    with pytest.raises(ValueError, match="duplicate"):
        train([dict(name="d", kind="jsonl", path=good), dict(name="d", kind="jsonl", path=good)])
    with pytest.raises(ValueError, match="no text key 'body'"):
        train([dict(name="k", kind="jsonl", path=good, text_key="body", split="all")])
    with pytest.raises(ValueError, match="corpus sources need data.cache_dir"):
        train([dict(name="c", kind="corpus")])
    with pytest.raises(ValueError, match="global_batch_size=3"):
        pipeline.make_train_iterator(
            {"sources": [dict(name="g", kind="jsonl", path=good, split="all")]}, tok, SEQ_LEN, 3, 0, 0, 2
        )


def test_worker_processes_give_the_same_batches(small_tokenizer, tmp_path):
    sources = [dict(name="a", kind="jsonl", path=_write_jsonl(tmp_path / "a.jsonl", _docs(20)), split="all")]
    outputs = []
    for workers in (0, 1):
        it = pipeline.make_train_iterator(
            {"sources": sources, "num_workers": workers}, small_tokenizer, SEQ_LEN, 4, 0, 0, 1
        )
        outputs.append([{k: v.copy() for k, v in next(it).items()} for _ in range(3)])
        state = it.get_state()
        if workers:
            it.close()
    for want, got in zip(*outputs):
        for key in pipeline.BATCH_KEYS:
            np.testing.assert_array_equal(want[key], got[key])
    assert state  # the worker-backed iterator is checkpointable too


def test_whole_document_packing_keeps_documents_intact_resumes_and_rejects_long_ones(small_tokenizer, tmp_path):
    tok = small_tokenizer
    rng = random.Random(7)
    texts = [f"w{i} " + " ".join(rng.choice(["alpha", "beta", "def", "12"]) for _ in range(rng.choice([1, 4, 9])))
             for i in range(30)]
    sizes = {t: len(tok.encode(t, bos=True, eos=True)) - 1 for t in texts}
    seq_len = max(sizes.values()) + 2
    src = dict(name="whole_src", kind="jsonl", path=_write_jsonl(tmp_path / "w.jsonl", texts), split="all",
               packing="whole")

    def make(source=src, length=seq_len):
        return pipeline.make_train_iterator({"sources": [source], "shuffle": False}, tok, length, 2, seed=0,
                                            process_index=0, process_count=1)

    it = make()
    stream_in, stream_tgt, whole_rows = [], [], 0
    states = []
    for _ in range(12):
        states.append(json.loads(json.dumps(it.get_state())))
        b = next(it)
        _check_row_structure(b, tok.bos_id)
        for row in range(2):
            seg, inp = b["segment_ids"][row], b["inputs"][row]
            for s in range(1, int(seg.max()) + 1):  # every segment is a whole document: starts with BOS
                piece = np.flatnonzero(seg == s)
                assert inp[piece[0]] == tok.bos_id and b["positions"][row][piece[0]] == 0
            whole_rows += int(b["loss_mask"][row].sum() < seq_len)
        # documents come whole and in stream order (no shuffle): the rows' real tokens are the document stream
        stream_in += [x for r in range(2) for x in b["inputs"][r][b["loss_mask"][r] == 1].tolist()]
        stream_tgt += [x for r in range(2) for x in b["targets"][r][b["loss_mask"][r] == 1].tolist()]
    want_in, want_tgt = _expected_stream(tok, texts * 3)
    assert stream_in == want_in[:len(stream_in)] and stream_tgt == want_tgt[:len(stream_tgt)]
    assert whole_rows > 0  # rows end with padding rather than split a document
    for step in (0, 5, 11):  # resume from a JSON round trip of the state
        resumed = make()
        resumed.set_state(states[step])
        replay = make()
        replay.set_state(states[0])
        for _ in range(step):
            next(replay)
        np.testing.assert_array_equal(next(resumed)["inputs"], next(replay)["inputs"])

    with pytest.raises(ValueError, match=r"data source 'whole_src' packs whole documents .* rows hold 6"):
        next(make(length=6))
    with pytest.raises(ValueError, match="data source 'x': unknown packing 'split'"):
        pipeline.SourceSpec.from_config(dict(name="x", kind="corpus", packing="split"), 0)
