"""Reward-model ranking loss (three-way case), the scalar head on the last token, exact model averaging."""
import math

import jax
import numpy as np
import pytest

from llama_jax.model import transformer
from llama_jax.posttrain import reward
from llama_jax.train import averaging


def _nls(x):  # −log σ(x)
    return math.log1p(math.exp(-x))


def test_ranking_loss_two_and_three_way():
    rc, rr, re = np.array([1.0, 0.0]), np.array([-1.0, 0.5]), np.array([2.0, 0.0])
    total, count = reward.ranking_loss(rc, rr, re, np.array([1.0, 0.0]))
    # record 0: e>c, e>r, c>r; record 1 (no edited): c>r only
    expected = _nls(1.0) + _nls(3.0) + _nls(2.0) + _nls(-0.5)
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert float(count) == 4.0
    total2, count2 = reward.ranking_loss(rc, rr)
    assert float(total2) == pytest.approx(_nls(2.0) + _nls(-0.5), rel=1e-6) and float(count2) == 2.0
    # the edited > chosen order matters: swapping edited and chosen raises the loss
    swapped, _ = reward.ranking_loss(re, rr, rc, np.array([1.0, 0.0]))
    assert float(swapped) > float(total)


def test_reward_is_the_head_on_the_last_token(tiny_cfg):
    params = transformer.init(tiny_cfg, jax.random.key(0))
    tokens = np.array([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]], np.int32)
    seg = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int32)
    pos = np.array([[0, 1, 2, 0, 0], [0, 1, 2, 3, 4]], np.int32)
    r = reward.rewards(tiny_cfg, params, tokens, pos, seg, head_id=100)
    logits = transformer.forward(tiny_cfg, params, tokens[:1, :3])
    assert float(r[0]) == pytest.approx(float(logits[0, 2, 100]), rel=1e-5, abs=1e-5)
    logits = transformer.forward(tiny_cfg, params, tokens[1:])
    assert float(r[1]) == pytest.approx(float(logits[0, 4, 100]), rel=1e-5, abs=1e-5)


def test_reward_model_of_another_vocabulary_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="vocab_size 999 but the sampling model has 640"):
        reward.check_vocabulary(tiny_cfg.replace(vocab_size=999), tiny_cfg, "rm")


def test_averaging_is_exact():
    a = {"w": np.array([1.0, 2.0], np.float32), "b": {"x": np.array([[4.0]], np.float32)}}
    b = {"w": np.array([3.0, 6.0], np.float32), "b": {"x": np.array([[0.0]], np.float32)}}
    c = {"w": np.array([5.0, -2.0], np.float32), "b": {"x": np.array([[8.0]], np.float32)}}
    uni = averaging.average([a, b, c])
    np.testing.assert_array_equal(uni["w"], [3.0, 2.0])
    np.testing.assert_array_equal(uni["b"]["x"], [[4.0]])
    wt = averaging.average([a, b], weights=[3, 1])  # 0.75 a + 0.25 b
    np.testing.assert_array_equal(wt["w"], [1.5, 3.0])
    np.testing.assert_array_equal(wt["b"]["x"], [[3.0]])
    assert wt["w"].dtype == np.float32
    with pytest.raises(ValueError, match="shape"):
        averaging.average([a, {"w": np.zeros(3, np.float32), "b": {"x": np.zeros((1, 1), np.float32)}}])
    with pytest.raises(ValueError, match="weights"):
        averaging.average([a, b], weights=[1.0])
