"""Needle / passkey evaluation: trial layout, scoring against oracle predictors, table and heat map."""
import os

import jax
import numpy as np
import pytest

from llama_jax.infer import needle
from llama_jax.model import config, transformer


def encode(text):  # a byte-level toy tokenizer: ids 1..256
    return [b + 1 for b in text.encode()]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_trial_has_exact_length_needle_at_depth_and_answer_mask(depth):
    toks, mask = needle.make_trial(encode, 0, 400, depth, 12345)
    assert toks.shape == mask.shape == (400,) and toks[0] == 0
    text = bytes(int(t) - 1 for t in toks[1:]).decode()
    assert text.endswith("What is the pass key? The pass key is 12345")
    where = text.index("The pass key is 12345. Remember it.")
    assert abs(where / (len(text) - 120) - depth) < 0.1
    answered = toks[1:][mask[:-1] == 1]  # the tokens predicted at masked positions
    assert bytes(int(t) - 1 for t in answered).decode() == " 12345"
    with pytest.raises(ValueError, match="too short"):
        needle.make_trial(encode, 0, 40, depth, 12345)


def test_scoring_with_oracles_table_and_heatmap(tmp_path):
    cfg = config.tiny()
    perfect = lambda t: np.roll(t, -1, axis=1)  # noqa: E731 - predicts every next token

    def wrong_on_long(t):
        p = perfect(t)
        if t.shape[1] == 512:
            p[:, -3] = (p[:, -3] + 1) % 256  # one wrong answer digit
        return p

    r = needle.evaluate(cfg, None, encode, 0, [256, 512], [0.0, 0.5], trials=3, predict=wrong_on_long)
    np.testing.assert_array_equal(r.accuracy, [[1.0, 1.0], [0.0, 0.0]])
    assert r.mean(256) == 1.0 and r.mean() == 0.5
    np.testing.assert_allclose(r.token_accuracy, [[1.0, 1.0], [5 / 6, 5 / 6]])  # 1 of the 6 answer bytes wrong
    assert r.to_json()["token_accuracy"] == [[1.0, 1.0], [0.8333, 0.8333]]
    assert "| 512 | 0.00 | 0.00 | 0.00 |" in needle.format_table(r)
    png = needle.write_heatmap(r, str(tmp_path / "needle.png"))
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 1000
    with pytest.raises(ValueError, match=r"needle length\(s\) \[4096\] exceed the model's max_seq_len 2048"):
        needle.evaluate(cfg, None, encode, 0, [4096], [0.5], predict=perfect)


def test_model_path_runs_and_random_model_does_not_retrieve():
    cfg = config.tiny().replace(n_layers=1)
    params = transformer.init(cfg, jax.random.key(0))
    r = needle.evaluate(cfg, params, encode, 0, [128], [0.5], trials=2)
    assert r.accuracy.shape == (1, 1) and r.accuracy[0, 0] == 0.0
