"""FP8 (e4m3) row-wise quantized inference, as served in the Llama 3 paper (§6) and Meta's reference code.

What is quantized (llama-models `quantization/loader.py`): the feed-forward weights w1, w3, w2 of layers
1 .. L-2 only. The first and last layers, attention, norms, embedding and output head stay in the compute
dtype (bf16 when serving).
  * Weights: float8_e4m3fn with one float32 scale per output row (per output channel). For our [in, out]
    kernels that is one scale per column: scale_j = max_i |W_ij| / 448.
  * Activations: quantized per token (row) at run time with a dynamic scale from the row's max |x|, where the
    max is capped at `fp8_activation_scale_ub` = 1200 (values beyond the cap saturate at ±1200), as FBGEMM's
    `quantize_fp8_per_row(x, scale_ub)`; the cap keeps high-perplexity tokens (dates, ...) from underflowing
    the rest of the row.
  * Matmul: fp8 x fp8 with float32 accumulation, then the outer product of the two row scales (FBGEMM's
    `f8f8bf16_rowwise`), output cast to the compute dtype.

Representation: `quantize_params(cfg, params)` returns `(qcfg, qparams)` with `qcfg.scan_layers = False` and a
per-layer tree (`layers_0`, ..., see `llama_jax.model.unstack_layers`) whose quantized layers hold
`mlp/{w1, w3, w2}` as float8_e4m3fn plus `mlp/{w1_scale, w3_scale, w2_scale}` (float32, one per output row) and
`mlp/activation_scale_ub`. Per-layer storage is what lets layer 0 and L-1 keep their bf16 weights. `apply`
runs the unmodified Linen model with a Flax method interceptor that swaps the SwiGLU of quantized layers for
`fp8_swiglu`. The fp8 dot is written as a dot of float8 operands with a float32 result: XLA runs it on fp8
tensor cores where the hardware has them (H100 / MI300) and otherwise upcasts the float8 operands, which is
an exact emulation (fp8 x fp8 products are exact in float32). CPUs have no fp8 units, so on CPU this path is
numerics only, not speed.

Measured drift (tests/infer/test_quant.py: random tiny model, dim 64, 4 layers of which 2 quantized, vocab 512,
float32 compute, 120 tokens of text sampled from the model itself; CPU emulation):
  * logits, FP8 vs f32: max |Δ| / max |logit| = 0.103 (test bound 0.15); mean |Δ| / mean |logit| = 0.074
    (bound 0.10); max |Δ| = 0.55 on logits of magnitude ~5;
  * perplexity: 257.6 vs 256.0, |ppl_fp8 / ppl_f32 - 1| = 0.0065 (bound 0.02);
  * for comparison bf16 compute vs f32 on the same model: 0.052 / 0.026 / 0.0007 (the test requires FP8's
    max logit error to exceed bf16's). A 64-wide model is a worst case for per-row scaling noise (few terms per
    dot product to average it out); wider models drift less.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llama_jax import model
from llama_jax.model import layers
from llama_jax.model.config import ModelConfig

Params = Any
FP8_DTYPE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_DTYPE).max)  # 448
FP8_ACTIVATION_SCALE_UB = 1200.0
_EPS = 1e-12
_FFN = ("w1", "w3", "w2")


def quantize_rows(x, axis: int = -1, scale_ub: float | jax.Array | None = None):
    """Row-wise float8_e4m3fn quantization: returns (q, inv_scale) with x ≈ q * inv_scale.

    The row max over `axis` is capped at `scale_ub` when given (values beyond it saturate), floored at 1e-12,
    and mapped to ±448. `inv_scale` keeps `axis` as size 1 (float32).
    """
    x = jnp.asarray(x, jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=True)
    if scale_ub is not None:
        amax = jnp.minimum(amax, jnp.asarray(scale_ub, jnp.float32))
    amax = jnp.maximum(amax, _EPS)
    scale = FP8_MAX / amax
    q = jnp.clip(x * scale, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
    return q, 1.0 / scale


def quantize_weight(w_IO):
    """[in, out] kernel -> (float8 [in, out], float32 scale [out]) with one scale per output row."""
    q, inv = quantize_rows(w_IO, axis=0)
    return q, inv[0]


def fp8_linear(x_BTI, wq_IO, w_scale_O, activation_scale_ub):
    """y = (fp8(x) @ fp8(W)) * x_scale * w_scale, float32 accumulation; returns float32."""
    xq, x_inv = quantize_rows(x_BTI, axis=-1, scale_ub=activation_scale_ub)
    acc = jnp.einsum("...i,io->...o", xq, wq_IO, preferred_element_type=jnp.float32)
    return acc * x_inv * w_scale_O.astype(jnp.float32)


def fp8_swiglu(x_BTD, p: dict, out_dtype):
    """SwiGLU w2(silu(w1 x) ⊙ w3 x) with every matmul in fp8 (dynamic per-token activation scales)."""
    ub = p["activation_scale_ub"]
    gate = fp8_linear(x_BTD, p["w1"], p["w1_scale"], ub).astype(out_dtype)
    up = fp8_linear(x_BTD, p["w3"], p["w3_scale"], ub).astype(out_dtype)
    hidden = nn.silu(gate) * up
    return fp8_linear(hidden, p["w2"], p["w2_scale"], ub).astype(out_dtype)


def quantize_params(cfg: ModelConfig, params: Params,
                    activation_scale_ub: float = FP8_ACTIVATION_SCALE_UB) -> tuple[ModelConfig, Params]:
    """Scanned f32/bf16 params -> (cfg with scan_layers=False, per-layer params with FP8 FFNs in layers
    1..L-2). Models with fewer than 3 layers have nothing to quantize and come back unchanged (unscanned)."""
    if "layers" not in params:
        raise ValueError("quantize_params expects the scanned parameter tree (layers/block/...)")
    per_layer = model.unstack_layers(cfg, params)
    for i in range(1, cfg.n_layers - 1):
        mlp = dict(per_layer[f"layers_{i}"]["mlp"])
        for name in _FFN:
            mlp[name], mlp[f"{name}_scale"] = quantize_weight(mlp[name])
        mlp["activation_scale_ub"] = jnp.asarray(activation_scale_ub, jnp.float32)
        per_layer[f"layers_{i}"] = {**per_layer[f"layers_{i}"], "mlp": mlp}
    return cfg.replace(scan_layers=False), per_layer


def is_quantized(params: Params) -> bool:
    return any("w1_scale" in v.get("mlp", {}) for k, v in params.items() if k.startswith("layers_"))


def _fp8_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if isinstance(module, layers.MLP) and context.method_name == "__call__":
        p = module.variables.get("params", {})
        if "w1_scale" in p:
            return fp8_swiglu(args[0], p, jnp.dtype(module.cfg.dtype))
    return next_fun(*args, **kwargs)


def apply(cfg: ModelConfig, qparams: Params, tokens, positions=None, segment_ids=None, cache=None,
          return_hidden: bool = False):
    """`llama_jax.model.apply` for params from `quantize_params` (same arguments and results)."""
    if cfg.scan_layers:
        raise ValueError("quantized params are per-layer: use the cfg returned by quantize_params "
                         "(scan_layers=False)")
    with nn.intercept_methods(_fp8_interceptor):
        return model.apply(cfg, qparams, tokens, positions, segment_ids, cache, return_hidden)


def forward(cfg: ModelConfig, qparams: Params, tokens, positions=None, segment_ids=None):
    """Float32 logits [B, T, V] of the FP8 model."""
    return apply(cfg, qparams, tokens, positions, segment_ids)[0]
