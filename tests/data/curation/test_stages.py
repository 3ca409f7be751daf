"""Per-document curation functions against hand-computed values: MinHash vs exact Jaccard, URL normalization,
PII masks, language ID on short samples, heuristics on crafted documents, HTML extraction, quality/routing."""

import random

import numpy as np
import pytest

from llama_jax.data.curation import config as config_lib
from llama_jax.data.curation import dedup, extract, heuristics, language, pii


def _exact_jaccard(a: str, b: str, n: int) -> float:  # independent of dedup.shingles
    def grams(t):
        w = "".join(ch if ch.isalnum() or ch == "_" else " " for ch in t.lower()).split()
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}
    ga, gb = grams(a), grams(b)
    return len(ga & gb) / len(ga | gb)


def test_minhash_estimates_jaccard_within_sampling_error():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    base = [rng.choice(vocab) for _ in range(400)]
    a, b = dedup.permutations(256, seed=3)
    for changed in (5, 20, 60, 150):
        variant = list(base)
        for i in rng.sample(range(len(base)), changed):
            variant[i] = rng.choice(vocab)
        s1, s2 = " ".join(base), " ".join(variant)
        exact = _exact_jaccard(s1, s2, 5)
        assert dedup.jaccard(dedup.shingles(s1, 5), dedup.shingles(s2, 5)) == pytest.approx(exact)
        est = dedup.estimated_jaccard(dedup.minhash(s1, 5, a, b), dedup.minhash(s2, 5, a, b))
        assert abs(est - exact) < 4 * np.sqrt(exact * (1 - exact) / 256) + 0.01, (changed, exact, est)
    sig = dedup.minhash(" ".join(base), 5, a, b)
    assert sig.dtype == np.uint32 and np.array_equal(sig, dedup.minhash(" ".join(base), 5, a, b))
    assert len(dedup.band_keys(sig, 32, 8)) == 32
    with pytest.raises(ValueError, match="bands"):
        dedup.band_keys(sig, 10, 8)
    from llama_jax.data.curation import dedup_transforms, records  # noqa: PLC0415

    cfg = config_lib.get_config().near_dedup
    cfg.shingle_size = dedup.MAX_SHINGLE_SIZE + 1
    with pytest.raises(ValueError, match=r"near_dedup: shingle_size must be in \[1, 64\], got 65"):
        dedup_transforms.NearDedup(cfg, records.StageContext(records.TokenCounter(), 10))


def test_url_normalization():
    n = dedup.normalize_url
    assert n("https://WWW.Example.com:443/a/b/?utm_source=x&b=2&a=1#frag") == "example.com/a/b?a=1&b=2"
    assert n("http://example.com/a/b?a=1&b=2") == n("example.com/a/b/?b=2&a=1")
    assert n("http://example.com:8080/") == "example.com:8080/"
    assert n("http://example.com/x?id=1") != n("http://example.com/x?id=2")
    assert n("http://example.com/x?id=1", strip_query=True) == n("http://example.com/x?id=2", strip_query=True)


@pytest.mark.parametrize("text, masked, counts", [
    ("write to jane.doe+news@mail.example.org today", "write to <EMAIL> today", (1, 0, 0)),
    ("call +1 415-555-0132 or (020) 7946 0958", "call <PHONE> or <PHONE>", (0, 2, 0)),
    ("hosts 10.0.0.1, 255.255.255.255 and 2001:db8::8a2e:370:7334", "hosts <IP_ADDRESS>, <IP_ADDRESS> and "
     "<IP_ADDRESS>", (0, 0, 3)),
    ("Python 3.12.1 on 2024-01-31 12:30:45, 999.1.1.1, x[::2], id 1234567890", None, (0, 0, 0)),
])
def test_pii_masks(text, masked, counts):
    out, c = pii.mask(text)
    assert out == (masked if masked is not None else text)
    assert (c["email"], c["phone"], c["ip"]) == counts


@pytest.mark.parametrize("text, lang", [
    ("The cat sat on the mat and looked out of the window.", "en"),
    ("Le chat est assis sur le tapis et regarde par la fenêtre.", "fr"),
    ("Die Katze sitzt auf der Matte und schaut aus dem Fenster.", "de"),
    ("El gato está sentado en la alfombra y mira por la ventana.", "es"),
    ("Кошка сидит на коврике и смотрит в окно.", "ru"),
])
def test_language_id_on_short_samples(text, lang):
    detected, prob = language.identify(text)
    assert detected == lang and 0.3 < prob <= 1.0  # Russian competes with Ukrainian and Bulgarian


def test_heuristics_on_crafted_documents():
    cfg = config_lib.get_config().heuristics
    good = ("Return a new list containing all items from the iterable in ascending order. A custom key "
            "function can be supplied to customize the sort order, and the reverse flag can be set to request "
            "the result in descending order.")
    s = heuristics.scores(good)
    assert heuristics.verdict(s, cfg) is None
    assert s["words"] == 39 and s["dirty_word_ratio"] == 0.0
    assert heuristics.verdict(heuristics.scores("too short"), cfg) == "too_short"
    repeated = " ".join(["buy the best cheap watches online today"] * 10)
    s = heuristics.scores(repeated)
    # 7 words x 10; the most frequent bigrams occur 10 times, the longest is "watches online": 13 * 10 / 330.
    assert s["top_ngram_2"] == pytest.approx(130 / 330) and heuristics.verdict(s, cfg) == "top_ngram_2"
    # dup n-gram coverage by hand: 12 distinct words, then the first 6 repeated -> 6+6 of 18 words covered.
    words = [f"word{i:02d}" for i in range(12)]
    text = " ".join(words + words[:6])
    assert heuristics.scores(text)["dup_ngram_5"] == pytest.approx(12 / 18)
    dirty = good + " fuck shit porn"
    assert heuristics.verdict(heuristics.scores(dirty), cfg) == "dirty_words"
    # Hashtags and ellipses count as symbols; '#' comments, '##' banners and '#!' do not.
    assert heuristics.symbol_count("#tag #two ok... and… # comment ## banner #!/bin/sh x#y") == 4
    hashtags = " ".join(f"#tag{i}" for i in range(15)) + " " + good
    assert heuristics.verdict(heuristics.scores(hashtags), cfg) == "symbol_ratio"  # 15 / 54 > 0.25
    code = ("# Copyright and licence header\n#\n##########\ndef mean(values):\n    # empty input has no mean\n"
            "    if not values:  # raise early\n        raise ValueError('mean of an empty sequence')\n"
            "    # sum in one pass, then divide\n    return sum(values) / len(values)\n")
    s = heuristics.scores(code)
    assert s["symbol_word_ratio"] == 0.0 and heuristics.verdict(s, cfg) is None
    # The n-gram repetition rules judge only documents of at least ngram_min_words words.
    short = "Put terminal into raw mode. Put terminal into cbreak mode."
    s = heuristics.scores(short)
    assert s["top_ngram_2"] > cfg.max_top_ngram_fraction[0] and s["words"] < cfg.ngram_min_words
    assert heuristics.verdict(s, cfg) is None
    # KL divergence by hand: corpus {a: 3, b: 1}, document "a b" -> p = (1/2, 1/2), q = ((3+1)/7, (1+1)/7).
    kl = heuristics.kl_divergence(["a", "b"], {"a": 3, "b": 1}, 4)
    assert kl == pytest.approx(0.5 * np.log(0.5 / (4 / 7)) + 0.5 * np.log(0.5 / (2 / 7)))


def test_extract_keeps_main_text_code_and_math_and_drops_boilerplate():
    html = """<html><body><nav><a href="/">Home</a> | <a href="/about">About us</a></nav>
    <div class="cookie-banner">We use cookies. Accept all cookies.</div>
    <article><h1>Iterating in linear time</h1><p>The sequence is defined by a recurrence relation, and an
    iterative implementation computes the n-th number in linear time with constant memory.</p>
    <pre><code>def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a</code></pre>
    <p>The closed form is $F_n = (\\varphi^n - \\psi^n) / \\sqrt 5$, with the golden ratio as base, and
    <math><semantics><mi>x</mi><annotation encoding="application/x-tex">x^2 + y^2 = r^2</annotation>
    </semantics></math> describes a circle of radius r around the origin.</p></article>
    <footer>Copyright 2024 Example Corp. All rights reserved. Privacy policy</footer></body></html>"""
    text = extract.extract(html)
    assert "for _ in range(n):\n        a, b = b, a + b" in text
    assert "\\varphi^n" in text and "x^2 + y^2 = r^2" in text and "linear time" in text
    for boilerplate in ("About us", "cookies", "All rights reserved"):
        assert boilerplate not in text
    assert extract.extract("<html><body></body></html>") == ""


def test_quality_model_separates_seeds_from_junk_and_routes_code():
    from llama_jax.data.curation import quality

    model = quality.QualityModel.train(n_seed_documents=120, seed=0)
    held_out = quality.seed_documents(40, seed=123)["junk"]  # junk the model did not see
    junk_scores = [p for p, _ in model.score(held_out)]
    assert np.mean(np.asarray(junk_scores) < 0.5) > 0.75
    prose = ("Return the number of items in the container. If the container is empty, zero is returned; a "
             "negative size raises ValueError.")
    code = "def size(container):\n    if not container:\n        return 0\n    return len(container)\n"
    spam = "Buy cheap watches online best price free shipping click here now!!!\nBest deal casino bonus win"
    (p_prose, d_prose), (p_code, d_code), (p_spam, _) = model.score([prose, code, spam])
    texts = [prose, code, spam] + held_out  # scored with the features hashed once, as each whole pipeline does
    assert [p for p, _ in model.score(texts)] == model.quality.predict_proba(texts)[:, 1].tolist()
    assert [d == "code" for _, d in model.score(texts)] == (model.router.predict_proba(texts)[:, 1] >= 0.5).tolist()
    assert d_prose == "prose" and d_code == "code"
    assert p_prose > 0.5 and p_code > 0.5 and p_spam < 0.5


def test_stage_names_are_validated():
    assert config_lib.parse_stages("") == config_lib.STAGES
    assert config_lib.parse_stages("pii,extract") == ("extract", "pii")
    with pytest.raises(ValueError, match="unknown curation stage"):
        config_lib.parse_stages("extract,dedup")


def test_quality_model_is_fitted_once_per_inputs_and_cached(tmp_path, monkeypatch, caplog):
    from llama_jax.data.curation import quality

    fits = []
    train = quality.QualityModel.train
    monkeypatch.setattr(quality.QualityModel, "train", classmethod(lambda cls, *a: fits.append(a) or train(*a)))
    monkeypatch.setattr(quality, "_FITTED", {})
    texts = ["def f(x):\n    return x + 1\n", "Buy cheap watches online best price free shipping click here now!!!"]
    first = quality.QualityModel.cached(40, 2**12, 0, str(tmp_path))
    assert fits == [(40, 2**12, 0)] and len(list(tmp_path.glob("quality-*.pkl"))) == 1
    monkeypatch.setattr(quality, "_FITTED", {})  # as a new process: loaded from the file, not refitted
    assert quality.QualityModel.cached(40, 2**12, 0, str(tmp_path)).score(texts) == first.score(texts)
    assert quality.QualityModel.cached(40, 2**12, 0, str(tmp_path)) is quality.QualityModel.cached(40, 2**12, 0)
    assert len(fits) == 1
    quality.QualityModel.cached(40, 2**12, 1, str(tmp_path))  # another seed: another key
    assert len(fits) == 2 and len(list(tmp_path.glob("quality-*.pkl"))) == 2
    monkeypatch.setattr(quality, "_FITTED", {})
    for path in tmp_path.glob("quality-*.pkl"):
        path.write_bytes(b"truncated")
    assert quality.QualityModel.cached(40, 2**12, 0, str(tmp_path)).score(texts) == first.score(texts)  # refitted
    assert len(fits) == 3
    monkeypatch.setattr(quality, "_FITTED", {})
    (tmp_path / "file").write_text("")
    quality.QualityModel.cached(40, 2**12, 0, str(tmp_path / "file" / "cache"))  # cannot be written: fitted anyway
    assert len(fits) == 4 and "cannot cache the fitted models" in caplog.text
