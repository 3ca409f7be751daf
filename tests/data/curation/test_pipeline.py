"""The Beam curation pipeline end to end. One all-stage run on a planted input (1 worker) is shared by the
assertions below; a second run of the same input with 2 workers must write byte-identical shards.

Planted: near duplicates at exact 5-gram Jaccard similarities above and below the 0.8 threshold, an exact
duplicate up to whitespace, three versions of one URL with different dates, a line in 9 documents (removed) and
one in exactly 6 (kept), PII, HTML with boilerplate, French, keyword spam, navigation boilerplate and bad input (malformed
JSON, a record without text, an undecodable line, an empty file). The output then trains a tiny pretrain stage."""

import functools
import glob
import importlib.util
import json
import os
import pathlib
import random

import pytest
from array_record.python import array_record_module

from llama_jax.data import corpus
from llama_jax.data import curation
from llama_jax.data.curation import dedup, quality, stats as stats_lib

REPEATED_LINE = "Subscribe to our newsletter for weekly updates on everything."  # 9 documents: removed
SIX_TIMES_LINE = "This line appears in exactly six documents and stays."  # 6 documents: kept
SPAM = "Buy cheap watches online best price free shipping click here now!!!"
BOILERPLATE = (("Home", "About us", "Contact", "Blog"), ("Privacy policy", "Terms of service", "Cookie settings"),
               ("Accept all cookies", "Subscribe to our newsletter"),
               ("Follow us on social media", "All rights reserved", "Copyright 2024"))


def _stdlib_prose(n):
    """``n`` docstring documents of more than 80 words from the standard library (deterministic)."""
    root = corpus.stdlib_dir()
    docs = []
    for rel in [f for f in corpus.list_files(root) if f.endswith(".py")][::7]:
        if os.path.getsize(os.path.join(root, rel)) > 30_000:
            continue
        prose = corpus.extract_docstrings(corpus.read_text(os.path.join(root, rel)))
        if 80 < len(prose.split()) < 600:
            docs.append(prose)
        if len(docs) == n:
            return docs
    raise AssertionError(f"found only {len(docs)} standard-library docstring documents")


def _variant(rng, words, changed, vocab):
    ws = list(words)
    for i in rng.sample(range(len(ws)), changed):
        ws[i] = rng.choice(vocab)
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


def _config():
    cfg = curation.get_config()
    cfg.num_shards = 3
    cfg.quality.cache_dir = ""  # fitted once for the module (below), not cached on disk
    return cfg


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    rng = random.Random(0)
    prose = _stdlib_prose(26)
    base_words = " ".join(prose[:6]).split()[:400]
    vocab = sorted(set(base_words))
    texts = {"base": " ".join(base_words), "near": _variant(rng, base_words, 3, vocab),
             "mid": _variant(rng, base_words, 20, vocab), "far": _variant(rng, base_words, 90, vocab)}
    docs = [{"text": v, "id": k} for k, v in texts.items()]
    docs += [
        {"text": prose[6], "id": "exact"},
        {"text": "  " + prose[6].replace(" ", "  \n ") + "\n", "id": "exact_ws"},  # same words, other whitespace
        {"text": prose[7], "url": "https://www.example.com/news/a?utm_source=feed", "date": "2023-01-01",
         "id": "url_old"},
        {"text": prose[8], "url": "http://example.com/news/a/", "date": "2024-05-01T10:00:00Z", "id": "url_new"},
        {"text": prose[9], "url": "https://example.com/news/a#top", "id": "url_undated"},
        {"text": prose[10] + "\nMail me at someone@example.org or call +1 415-555-0132 from 10.0.0.1.",
         "id": "pii"},
    ]
    for i in range(8):
        lines = [prose[11 + i], REPEATED_LINE] + ([SIX_TIMES_LINE] if i < 6 else [])
        docs.append({"text": "\n".join(lines), "id": f"lines{i}"})
    docs.append({"text": REPEATED_LINE, "id": "only_repeated"})  # nothing left after line dedup
    page = prose[19].replace("\n", " ")
    docs.append({"html": f"<html><body><nav>Home | About us | Contact</nav><article><p>{page} Extracted from a "
                         "page.</p></article><footer>Copyright 2024. All rights reserved.</footer></body></html>",
                 "id": "html"})
    docs.append({"text": "Le chat est assis sur le tapis et regarde par la fenêtre pendant des heures. " * 3,
                 "id": "french"})
    docs.append({"text": "\n".join([SPAM] * 20), "id": "spam"})
    docs.append({"text": "\n".join(" | ".join(items) for items in BOILERPLATE), "id": "boilerplate"})
    docs += [{"text": t, "id": f"good{i}"} for i, t in enumerate(prose[21:26])]
    root = tmp_path_factory.mktemp("planted")
    (root / "in").mkdir()
    half = len(docs) // 2
    _write_jsonl(root / "in" / "a.jsonl", docs[:half], b"{broken json\n" + b'{"id": "no text"}\n')
    _write_jsonl(root / "in" / "b.jsonl", docs[half:], b'{"text": "bad \xff byte"}\n')
    (root / "in" / "empty.jsonl").write_bytes(b"")
    return root, texts, len(docs)


@pytest.fixture(scope="module")
def runs(planted):
    """The all-stage run with 1 worker and with 2 (the quality classifier is fitted once for both)."""
    root, _, _ = planted
    pattern = str(root / "in" / "*.jsonl")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quality.QualityModel, "train", functools.lru_cache(maxsize=1)(quality.QualityModel.train))
        one = curation.run(pattern, str(root / "out1"), _config())
        two = curation.run(pattern, str(root / "out2"), _config(),
                           pipeline_args=["--direct_num_workers=2", "--direct_running_mode=multi_processing"])
    records = [r for shard in _read_output(root / "out1").values() for r in shard]
    return one, two, {r["id"]: r for r in records}


def _removed(stats):
    return {r["stage"]: {k: v["docs"] for k, v in r["removed"].items()} for r in stats["stages"]}


def test_planted_near_and_exact_duplicates_and_url_dedup_keeps_newest(planted, runs):
    _, texts, _ = planted
    stats, _, by_id = runs
    # The planted similarities, computed exactly, lie on the intended sides of the 0.8 threshold.
    sh = {k: dedup.shingles(v, 5) for k, v in texts.items()}
    assert dedup.jaccard(sh["base"], sh["near"]) > 0.9
    assert 0.55 < dedup.jaccard(sh["base"], sh["mid"]) < 0.75
    assert dedup.jaccard(sh["base"], sh["far"]) < 0.35
    assert max(dedup.jaccard(sh[a], sh[b]) for a, b in (("near", "mid"), ("near", "far"), ("mid", "far"))) < 0.7
    assert {"base", "mid", "far", "exact", "url_new"} <= set(by_id)
    assert not {"near", "exact_ws", "url_old", "url_undated"} & set(by_id)
    removed = _removed(stats)
    assert removed["near_dedup"] == {"near_duplicate": 1}
    assert removed["exact_dedup"] == {"exact_duplicate": 1}
    assert removed["url_dedup"] == {"older_url_duplicate": 2}
    assert by_id["url_new"]["url"] == "http://example.com/news/a/" and by_id["url_new"]["date"].startswith("2024")
    examples = {e["key"]: e["text"] for e in stats["stages"][4]["removed"]["near_duplicate"]["examples"]}
    assert list(examples.values())[0].startswith("[id=near]")


def test_line_dedup_and_pii(runs):
    stats, _, by_id = runs
    for i in range(8):
        text = by_id[f"lines{i}"]["text"]
        assert REPEATED_LINE not in text and by_id[f"lines{i}"]["lines_removed"] == 1
        assert (SIX_TIMES_LINE in text) == (i < 6)
    assert "only_repeated" not in by_id
    assert _removed(stats)["line_dedup"] == {"all_lines_duplicated": 1}
    pii = by_id["pii"]
    assert pii["text"].endswith("Mail me at <EMAIL> or call <PHONE> from <IP_ADDRESS>.")
    assert pii["pii"] == {"email": 1, "phone": 1, "ip": 1}


def test_filters_language_and_bad_input_are_counted(planted, runs):
    root, _, n_docs = planted
    stats, _, by_id = runs
    removed = _removed(stats)
    assert removed["language"] == {"other_language": 1}  # french
    assert removed["heuristics"] == {"top_ngram_3": 1}  # spam
    assert removed["quality"] == {"low_quality_prose": 1}  # navigation boilerplate
    assert not {"french", "spam", "boilerplate"} & set(by_id)
    assert all(r["language"] == "en" and r["language_score"] >= 0.3 and r["quality"] >= 0.5 for r in by_id.values())
    assert {f"good{i}" for i in range(5)} <= set(by_id)
    assert "Extracted from a page." in by_id["html"]["text"] and "All rights reserved" not in by_id["html"]["text"]
    assert set(by_id["base"]["heuristics"]) >= {"dup_ngram_5", "top_ngram_2", "kl_divergence", "dirty_word_ratio"}
    assert stats["bad_input"] == {"malformed_json": 1, "no_text": 1, "undecodable": 1, "empty_file": 1}
    assert stats["input"]["files"] == 3 and stats["input"]["docs"] == n_docs
    assert [r["stage"] for r in stats["stages"]] == list(curation.STAGES)
    assert stats["output"]["docs"] == len(by_id) == n_docs - 8
    for row, nxt in zip(stats["stages"], stats["stages"][1:]):
        assert row["docs_out"] == nxt["docs_in"] and row["tokens_out"] == nxt["tokens_in"]
        assert row["docs_in"] - row["docs_out"] == sum(removed[row["stage"]].values())
    assert stats["stages"][0]["tokens_out"] > stats["stages"][0]["tokens_in"]  # extract adds the page's tokens
    assert os.path.getsize(root / "out1" / "stats.png") > 10_000
    assert json.loads((root / "out1" / "stats.json").read_text())["output"] == stats["output"]


def test_one_and_two_workers_write_identical_shards(planted, runs):
    root, _, _ = planted
    one, two, _ = runs
    names = sorted(os.listdir(root / "out1"))
    assert names == sorted(os.listdir(root / "out2"))
    assert [n for n in names if n.startswith("part-")] == [f"part-0000{i}-of-00003.array_record" for i in range(3)]
    for name in names:
        if name.startswith("part-"):
            assert (root / "out1" / name).read_bytes() == (root / "out2" / name).read_bytes(), name
    assert one["stages"] == two["stages"] and one["bad_input"] == two["bad_input"]


def test_existing_output_is_refused_and_a_failed_run_writes_nothing(planted, runs, monkeypatch):
    root, _, _ = planted
    before = {n: (root / "out1" / n).read_bytes() for n in os.listdir(root / "out1")}
    pattern = str(root / "in" / "*.jsonl")
    with pytest.raises(ValueError, match="already holds results"):
        curation.run(pattern, str(root / "out1"), stages="pii")
    with pytest.raises(FileNotFoundError, match="no input files"):
        curation.run(str(root / "missing" / "*.jsonl"), str(root / "out3"))
    with pytest.raises(ValueError, match="unknown pipeline option"):
        curation.run(pattern, str(root / "out3"), stages="pii", pipeline_args=["--bogus=1"])

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr(stats_lib, "plot", fail)  # fails after every shard is written, before publishing
    with pytest.raises(OSError, match="disk full"):
        curation.run(pattern, str(root / "out1"), stages="pii", overwrite=True)
    assert {n: (root / "out1" / n).read_bytes() for n in os.listdir(root / "out1")} == before
    assert not [p for p in os.listdir(root) if ".tmp-" in p or ".old-" in p or p == "out3"]


def test_curated_output_trains_a_tiny_pretrain_stage(planted, runs, tmp_path, small_tokenizer_path):
    root, _, _ = planted
    from llama_jax.stages import KINDS  # noqa: PLC0415 - heavy, only this test trains
    from llama_jax.train import driver  # noqa: PLC0415

    repo = pathlib.Path(__file__).resolve().parents[3]
    spec = importlib.util.spec_from_file_location("pretrain", repo / "experiments/pretrain.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny,steps=2,batch=8,seq_len=32,warmup=1,layers=1")
    c.tokenizer = small_tokenizer_path
    c.data.sources = [dict(name="curated", kind="array_record", path=str(root / "out1" / "part-*.array_record"),
                           text_key="text", split="all", eval_split="all", weight=1.0)]
    c.checkpoint.update(every_steps=2, async_save=False)
    c.eval.update(every_steps=0, batches=1)
    c.sample.max_new_tokens = 0  # the small tokenizer has fewer ids than the model: no sampling
    results = driver.run_experiment(c, str(tmp_path / "work"), KINDS)
    assert results["pretrain"]["step"] == 2
