"""The synthetic `passkey` source: training keys and filler kept apart from the needle evaluation's,
deterministic documents, options validated, and `eval_split="none"` leaving a source out of evaluation."""
import numpy as np
import pytest

from llama_jax.data import passkey, pipeline
from llama_jax.infer import needle


def test_training_documents_never_use_the_evaluation_keys_or_filler():
    docs = passkey.documents("pk", dict(documents=200, min_chars=50, max_chars=400), "train")
    assert docs == passkey.documents("pk", dict(documents=200, min_chars=50, max_chars=400), "train")
    assert not set(docs) & set(passkey.documents("pk", dict(documents=200, min_chars=50, max_chars=400),
                                                  "validation"))
    for d in docs:
        key = int(d.rsplit(" ", 1)[1])
        assert not passkey.is_eval_key(key) and 10_000 <= key < 100_000
        assert d.count(str(key)) == 3 and d.endswith(passkey.QUESTION + f" {key}")
        assert "The grass is green" not in d and "sky is blue" not in d
    rng = np.random.default_rng(0)
    eval_keys = {passkey.draw_key(rng, for_eval=True) for _ in range(200)}
    assert all(passkey.is_eval_key(k) for k in eval_keys)
    assert 0.4 < np.mean([passkey.is_eval_key(k) for k in range(10_000, 20_000)]) < 0.6  # half of the keys
    toks, _ = needle.make_trial(lambda t: [b + 1 for b in t.encode()], 0, 400, 0.5, 12345)
    assert needle.FILLER[:20] in bytes(int(t) - 1 for t in toks[1:]).decode()


def test_options_and_eval_split_none(tmp_path):
    with pytest.raises(ValueError, match=r"data source 'pk': unknown passkey option\(s\) \['max_char'\]"):
        pipeline.SourceSpec.from_config(dict(name="pk", kind="passkey", options=dict(max_char=3)), 0)
    with pytest.raises(ValueError, match="data source 'pk': passkey options need"):
        pipeline.SourceSpec.from_config(dict(name="pk", kind="passkey", options=dict(min_chars=9, max_chars=3)), 0)
    with pytest.raises(ValueError, match="data source 'c': 'options' are only read by kind 'passkey'"):
        pipeline.SourceSpec.from_config(dict(name="c", kind="corpus", options=dict(documents=3)), 0)

    class Tok:
        bos_id, eos_id = 1, 2

        def encode(self, text, bos=False, eos=False, **_):
            return [3 + b for b in text.encode()]

    pk = dict(name="pk", kind="passkey", options=dict(documents=8, max_chars=100))
    cfg = dict(sources=[pk, dict(pk, name="held_out_only_pk")], shuffle=False)
    cfg["sources"][0]["eval_split"] = "none"
    rows = [b for b in pipeline.make_eval_iterator(cfg, Tok(), 64, 1, 0, 1)]
    expected = [b for b in pipeline.make_eval_iterator(dict(sources=[cfg["sources"][1]]), Tok(), 64, 1, 0, 1)]
    assert len(rows) == len(expected) > 0
    np.testing.assert_array_equal(rows[0]["inputs"], expected[0]["inputs"])
    cfg["sources"][1]["eval_split"] = "none"
    with pytest.raises(ValueError, match="every source of 'sources' has eval_split 'none'"):
        pipeline.make_eval_iterator(cfg, Tok(), 64, 1, 0, 1)
    train = pipeline.make_train_iterator(dict(sources=[pk]), Tok(), 64, 2, seed=0, process_index=0, process_count=1)
    assert next(train)["inputs"].shape == (2, 64)
