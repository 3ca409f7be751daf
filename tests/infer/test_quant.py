"""FP8 row-wise inference: quantizer numerics, which tensors are quantized, and drift within documented bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import model
from llama_jax.infer import quant, sampling
from tests.interop.helpers import random_params, tiny_cfg

CFG = tiny_cfg(vocab_size=512, n_layers=4)


@pytest.fixture(scope="module")
def params():
    return random_params(CFG, seed=5)


def test_quantize_rows_error_and_activation_cap():
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32) * 3
    q, inv = quant.quantize_rows(x)
    assert q.dtype == jnp.float8_e4m3fn and inv.shape == (16, 1)
    deq = np.asarray(q, np.float32) * np.asarray(inv)
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 (above the subnormal range).
    big = np.abs(x) > np.abs(x).max(-1, keepdims=True) / 64
    assert np.all(np.abs(deq - x)[big] <= np.abs(x)[big] * 2.0 ** -4 + 1e-7)
    np.testing.assert_allclose(np.abs(deq).max(-1), np.abs(x).max(-1), rtol=1e-6)  # row max is exact
    # The dynamic activation scale is capped: entries beyond 1200 saturate at ±1200.
    row = np.array([[5000.0, -3000.0, 600.0, 1.0]], np.float32)
    q, inv = quant.quantize_rows(row, scale_ub=quant.FP8_ACTIVATION_SCALE_UB)
    np.testing.assert_allclose(np.asarray(q, np.float32) * np.asarray(inv), [[1200, -1200, 600, 1.0]], rtol=0.02)


def test_fp8_linear_matches_quant_dequant_emulation():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 64)).astype(np.float32)
    w = rng.standard_normal((64, 32)).astype(np.float32) * 0.1
    wq, ws = quant.quantize_weight(w)
    assert ws.shape == (32,)
    y = np.asarray(quant.fp8_linear(x, wq, ws, 1200.0))
    xq, xs = quant.quantize_rows(x, scale_ub=1200.0)
    ref = (np.asarray(xq, np.float64) * np.asarray(xs)) @ (np.asarray(wq, np.float64) * np.asarray(ws))
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(y - x @ w).max() < 0.1 * np.abs(x @ w).max()


def test_only_middle_ffn_weights_are_quantized(params):
    qcfg, qp = quant.quantize_params(CFG, params)
    assert not qcfg.scan_layers and quant.is_quantized(qp)
    per_layer = model.unstack_layers(CFG, params)
    for i in range(CFG.n_layers):
        layer, orig = qp[f"layers_{i}"], per_layer[f"layers_{i}"]
        middle = 0 < i < CFG.n_layers - 1
        for name in ("w1", "w2", "w3"):
            assert (layer["mlp"][name].dtype == jnp.float8_e4m3fn) == middle, (i, name)
            assert (f"{name}_scale" in layer["mlp"]) == middle
        for name, w in orig["attention"].items():
            np.testing.assert_array_equal(layer["attention"][name], w)
    assert qp["layers_1"]["mlp"]["w2_scale"].shape == (CFG.dim,)
    assert float(qp["layers_1"]["mlp"]["activation_scale_ub"]) == 1200.0


def test_drift_within_documented_bounds(params):
    """Bounds from the llama_jax.infer.quant docstring: logits and perplexity of FP8 vs float32."""
    qcfg, qp = quant.quantize_params(CFG, params)
    gen = sampling.generate(CFG, params, [[1, 2, 3], [400, 7]], max_new_tokens=60, temperature=1.0, seed=0)
    text = np.array([[1, 2, 3] + gen.tokens[0][:57], [400, 7] + gen.tokens[1][:58]])
    ref = np.asarray(jax.jit(lambda p, t: model.forward(CFG, p, t))(params, text))
    fp8 = np.asarray(jax.jit(lambda p, t: quant.forward(qcfg, p, t))(qp, text))
    bf16 = np.asarray(jax.jit(lambda p, t: model.forward(CFG.replace(dtype="bfloat16"), p, t))(params, text))

    def ppl(logits):
        logp = jax.nn.log_softmax(logits[:, :-1], -1)
        return float(np.exp(-np.take_along_axis(np.asarray(logp), text[:, 1:, None], -1).mean()))

    max_rel = np.abs(fp8 - ref).max() / np.abs(ref).max()
    mean_rel = np.abs(fp8 - ref).mean() / np.abs(ref).mean()
    ppl_drift = abs(ppl(fp8) / ppl(ref) - 1)
    assert max_rel < 0.15 and mean_rel < 0.10 and ppl_drift < 0.02, (max_rel, mean_rel, ppl_drift)
    assert np.abs(bf16 - ref).max() < np.abs(fp8 - ref).max()  # FP8 is the coarser of the two
    assert max_rel > 1e-3  # the quantized path really ran


def test_generate_with_fp8(params):
    prompts = [[5, 6, 7], [9]]
    exact = sampling.generate(CFG, params, prompts, max_new_tokens=6)
    fp8 = sampling.generate(CFG, params, prompts, max_new_tokens=6, quantize="fp8")
    assert len(fp8.tokens[0]) == 6 and fp8.tokens[0][0] == exact.tokens[0][0]
    qcfg, qp = quant.quantize_params(CFG, params)  # pre-quantized params are recognised
    assert sampling.generate(qcfg, qp, prompts, max_new_tokens=6).tokens == fp8.tokens
