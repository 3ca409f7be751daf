"""The Beam curation pipeline end to end: planted duplicates, URL and line dedup, bad input counted, identical
output with 1 and 2 workers, refusal to overwrite, and a tiny pretrain stage reading the output."""

import glob
import json
import os
import pathlib
import random

import pytest
from array_record.python import array_record_module

from llama_jax.data import corpus
from llama_jax.data import curation
from llama_jax.data.curation import dedup

DEDUP_STAGES = "url_dedup,exact_dedup,near_dedup,line_dedup,pii"
REPEATED_LINE = "Subscribe to our newsletter for weekly updates on everything."
SIX_TIMES_LINE = "This line appears in exactly six documents and stays."


def _words(rng, n):
    return " ".join(f"w{rng.randrange(5000)}" for _ in range(n))


def _variant(rng, text, changed):
    ws = text.split()
    for i in rng.sample(range(len(ws)), changed):
        ws[i] = f"x{rng.randrange(5000)}"
    return " ".join(ws)


def _write_jsonl(path, records, extra=b""):
    with open(path, "wb") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(extra)


def _read_output(directory):
    out = {}
    for path in sorted(glob.glob(os.path.join(directory, "part-*.array_record"))):
        reader = array_record_module.ArrayRecordReader(path)
        out[os.path.basename(path)] = [json.loads(r) for r in reader.read_all()]
        reader.close()
    return out


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = random.Random(0)
    base = _words(rng, 400)
    near, far = _variant(rng, base, 3), _variant(rng, base, 60)
    exact = _words(rng, 50)
    docs = [
        {"text": base, "id": "base"},
        {"text": near, "id": "near"},  # Jaccard ~0.93 with base: removed
        {"text": far, "id": "far"},  # Jaccard ~0.4 with base: kept
        {"text": exact, "id": "exact"},
        {"text": "  " + exact.replace(" ", "  \n ") + "\n", "id": "exact_ws"},  # same words, other whitespace
        {"text": _words(rng, 30), "url": "https://www.example.com/news/a?utm_source=feed", "date": "2023-01-01",
         "id": "url_old"},
        {"text": _words(rng, 30), "url": "http://example.com/news/a/", "date": "2024-05-01T10:00:00Z",
         "id": "url_new"},
        {"text": _words(rng, 30), "url": "https://example.com/news/a#top", "id": "url_undated"},
        {"text": "Mail me at someone@example.org or call +1 415-555-0132. " + _words(rng, 20), "id": "pii"},
    ]
    for i in range(8):
        lines = [_words(rng, 12), REPEATED_LINE, _words(rng, 12)] + ([SIX_TIMES_LINE] if i < 6 else [])
        docs.append({"text": "\n".join(lines), "id": f"lines{i}"})
    docs.append({"text": REPEATED_LINE, "id": "only_repeated"})  # nothing left after line dedup
    root = tmp_path_factory.mktemp("planted")
    (root / "in").mkdir()
    _write_jsonl(root / "in" / "a.jsonl", docs[:10], b"{broken json\n" + b'{"id": "no text"}\n')
    _write_jsonl(root / "in" / "b.jsonl", docs[10:], b'{"text": "bad \xff byte"}\n')
    (root / "in" / "empty.jsonl").write_bytes(b"")
    return root, {"base": base, "near": near, "far": far}


@pytest.fixture(scope="module")
def dedup_runs(planted):
    root, _ = planted
    cfg = curation.get_config()
    cfg.num_shards = 3
    one = curation.run(str(root / "in" / "*.jsonl"), str(root / "out1"), cfg, stages=DEDUP_STAGES)
    two = curation.run(str(root / "in" / "*.jsonl"), str(root / "out2"), cfg, stages=DEDUP_STAGES,
                       pipeline_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    return one, two


def test_planted_duplicates_and_bad_input(planted, dedup_runs):
    root, texts = planted
    stats, _ = dedup_runs
    # The planted similarities, computed exactly, are on the intended sides of the 0.8 threshold.
    sh = {k: dedup.shingles(v, 5) for k, v in texts.items()}
    assert dedup.jaccard(sh["base"], sh["near"]) > 0.9
    assert dedup.jaccard(sh["base"], sh["far"]) < 0.5
    records = [r for shard in _read_output(root / "out1").values() for r in shard]
    by_id = {r["id"]: r for r in records}
    assert {"base", "far", "exact", "url_new", "pii"} <= set(by_id)
    assert not {"near", "exact_ws", "url_old", "url_undated", "only_repeated"} & set(by_id)
    for i in range(8):
        text = by_id[f"lines{i}"]["text"]
        assert REPEATED_LINE not in text and by_id[f"lines{i}"]["lines_removed"] == 1
        assert (SIX_TIMES_LINE in text) == (i < 6)
    assert "someone@example.org" not in by_id["pii"]["text"] and "<EMAIL>" in by_id["pii"]["text"]
    assert by_id["pii"]["pii"] == {"email": 1, "phone": 1, "ip": 0}
    assert stats["bad_input"] == {"malformed_json": 1, "no_text": 1, "undecodable": 1, "empty_file": 1}
    removed = {r["stage"]: {k: v["docs"] for k, v in r["removed"].items()} for r in stats["stages"]}
    assert removed["url_dedup"] == {"older_url_duplicate": 2}
    assert removed["exact_dedup"] == {"exact_duplicate": 1}
    assert removed["near_dedup"] == {"near_duplicate": 1}
    assert removed["line_dedup"] == {"all_lines_duplicated": 1}
    assert stats["input"]["docs"] == 18 and stats["output"]["docs"] == len(records) == 13
    for row, nxt in zip(stats["stages"], stats["stages"][1:]):
        assert row["docs_out"] == nxt["docs_in"] and row["tokens_out"] == nxt["tokens_in"]
        assert row["docs_in"] - row["docs_out"] == sum(removed[row["stage"]].values())
    assert os.path.getsize(root / "out1" / "stats.png") > 10_000
    assert json.loads((root / "out1" / "stats.json").read_text())["output"]["docs"] == 13


def test_one_and_two_workers_write_identical_shards(planted, dedup_runs):
    root, _ = planted
    names = sorted(os.listdir(root / "out1"))
    assert names == sorted(os.listdir(root / "out2"))
    assert [n for n in names if n.startswith("part-")] == [f"part-0000{i}-of-00003.array_record" for i in range(3)]
    for name in names:
        if name.startswith("part-"):
            assert (root / "out1" / name).read_bytes() == (root / "out2" / name).read_bytes(), name
    one, two = dedup_runs
    assert [r for r in one["stages"]] == [r for r in two["stages"]]


def test_existing_output_is_refused_and_nothing_half_written(planted):
    root, _ = planted
    before = sorted(os.listdir(root / "out1"))
    with pytest.raises(ValueError, match="already holds results"):
        curation.run(str(root / "in" / "*.jsonl"), str(root / "out1"), stages="pii")
    with pytest.raises(FileNotFoundError, match="no input files"):
        curation.run(str(root / "missing" / "*.jsonl"), str(root / "out3"))
    with pytest.raises(ValueError, match="unknown pipeline option"):
        curation.run(str(root / "in" / "*.jsonl"), str(root / "out3"), stages="pii", pipeline_args=["--bogus=1"])
    assert sorted(os.listdir(root / "out1")) == before
    assert not [p for p in os.listdir(root) if ".tmp-" in p or p == "out3"]


def _stdlib_prose(n):
    root = corpus.stdlib_dir()
    docs = []
    for rel in [f for f in corpus.list_files(root) if f.endswith(".py")][::7]:
        if os.path.getsize(os.path.join(root, rel)) > 30_000:
            continue
        prose = corpus.extract_docstrings(corpus.read_text(os.path.join(root, rel)))
        if len(prose.split()) > 80:
            docs.append(prose)
        if len(docs) == n:
            return docs
    return docs


def test_all_stages_output_trains_a_tiny_pretrain_stage(tmp_path, small_tokenizer_path):
    docs = [{"text": t, "id": f"doc{i}"} for i, t in enumerate(_stdlib_prose(24))]
    docs.append({"html": "<html><body><nav>Home | About</nav><article><p>" + docs[0]["text"][:600].replace(
        "\n", " ") + " Extracted from a page.</p></article><footer>All rights reserved</footer></body></html>",
                 "id": "html"})
    docs.append({"text": "Le chat est assis sur le tapis et regarde par la fenêtre pendant des heures. " * 3,
                 "id": "french"})
    docs.append({"text": "\n".join(["Buy cheap watches online best price free shipping click here now!!!"] * 20),
                 "id": "spam"})
    (tmp_path / "in").mkdir()
    _write_jsonl(tmp_path / "in" / "docs.jsonl", docs)
    cfg = curation.get_config()
    cfg.quality.seed_documents = 200
    out = tmp_path / "curated"
    stats = curation.run(str(tmp_path / "in" / "*.jsonl"), str(out), cfg)
    assert [r["stage"] for r in stats["stages"]] == list(curation.STAGES)
    records = [r for shard in _read_output(out).values() for r in shard]
    ids = {r["id"] for r in records}
    assert "french" not in ids and "spam" not in ids and "html" in ids
    assert len(records) >= 18 and all(r["language"] == "en" and r["quality"] >= 0.5 for r in records)
    html_text = next(r["text"] for r in records if r["id"] == "html")
    assert "Extracted from a page." in html_text and "All rights reserved" not in html_text

    from llama_jax.train import loop  # noqa: PLC0415 - heavy, only this test trains

    repo = pathlib.Path(__file__).resolve().parents[3]
    spec = __import__("importlib.util").util.spec_from_file_location("pretrain", repo / "experiments/pretrain.py")
    mod = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny,steps=2,batch=8,seq_len=32,warmup=1,layers=1")
    c.tokenizer = small_tokenizer_path
    c.data.sources = [dict(name="curated", kind="array_record", path=str(out / "part-*.array_record"),
                           text_key="text", split="all", eval_split="all", weight=1.0)]
    c.checkpoint.update(every_steps=2, async_save=False)
    c.eval.update(every_steps=0, batches=1)
    c.sample.max_new_tokens = 0  # the small tokenizer has fewer ids than the model: no sampling
    results = loop.run_experiment(c, str(tmp_path / "work"))
    assert results["pretrain"]["step"] == 2
