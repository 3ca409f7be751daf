"""The Llama 3 decoder: embed -> L blocks (scanned, with a remat policy) -> RMSNorm -> output head.

Public functions (pure; parameters are plain pytrees of arrays):
    init(cfg, rng) -> params
    forward(cfg, params, tokens, positions=None, segment_ids=None) -> float32 logits [B, T, V]
    apply(cfg, params, tokens, ..., cache=None, return_hidden=False) -> (logits or hidden, new_cache)
    param_logical_specs(cfg) -> pytree of logical PartitionSpecs (shapes via eval_shape, nothing allocated)
    init_cache(cfg, batch, max_len, dtype) -> KV cache for decoding
    unstack_layers / stack_layers: scanned <-> per-layer ("layers_0", ...) parameter trees.

Stored tree (scan_layers=True):
    embed/embedding [V, D]
    layers/block/{attention_norm,ffn_norm}/scale [L, D]
    layers/block/attention/{wq [L, D, H, Dh], wk [L, D, K, Dh], wv [L, D, K, Dh], wo [L, H, Dh, D]}
    layers/block/mlp/{w1 [L, D, F], w3 [L, D, F], w2 [L, F, D]}
    norm/scale [D]; lm_head [D, V] (absent when embeddings are tied)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model.config import ModelConfig
from llama_jax.model.layers import Block, RMSNorm, constrain

Array = jax.Array
Params = Any


def _remat_policy(name: str):
    cp = jax.checkpoint_policies
    return {
        "full": None,  # save nothing: recompute the whole block in the backward pass
        "save_dots": cp.checkpoint_dots,
        "save_dots_no_batch": cp.checkpoint_dots_with_no_batch_dims,
        "save_qkv_out": cp.save_only_these_names("query_proj", "key_proj", "value_proj", "out_proj"),
    }[name]


class _ScanBlock(nn.Module):
    """Block adapted to nn.scan's (carry, xs) -> (carry, ys) signature."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer_kv, positions, segment_ids, kv_segment_ids, cache_index):
        cache = None if layer_kv is None else (layer_kv[0], layer_kv[1], kv_segment_ids)
        return Block(self.cfg, name="block")(x, positions, segment_ids, cache, cache_index)


def _lookup(table_VD: Array, tokens_BT: Array, dtype) -> Array:
    """Embedding lookup that partitions cleanly under every rule set.

    The table's `embed` dimension is gathered first (what FSDP does for every weight), leaving it sharded
    over the vocabulary only; XLA then partitions the row gather as Megatron's vocabulary-parallel lookup
    (each shard looks up the ids in its row range, the others contribute zeros, one all-reduce). Left to
    itself the partitioner would keep `embed` sharded in the output and fall back to replicating the
    activations (forward) or the whole table (backward) to reach the batch-sharded layout.
    """
    table_VD = constrain(table_VD.astype(dtype), ("vocab", None))
    return jnp.take(table_VD, tokens_BT, axis=0)


class Transformer(nn.Module):
    cfg: ModelConfig

    def _block_cls(self, scanned: bool):
        cls = _ScanBlock if scanned else Block
        if self.cfg.remat != "none":
            cls = nn.remat(cls, policy=_remat_policy(self.cfg.remat), prevent_cse=not scanned)
        return cls

    @nn.compact
    def __call__(self, tokens_BT, positions_BT, segment_ids_BT, cache=None, return_hidden=False):
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        embed = nn.Embed(cfg.vocab_size, cfg.dim, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                         embedding_init=nn.with_logical_partitioning(
                             nn.initializers.normal(stddev=cfg.init_std), ("vocab", "embed")),
                         name="embed")
        x = constrain(_lookup(embed.embedding, tokens_BT, dtype), ("act_batch", "act_length", "act_embed"))

        cache_index = None if cache is None else cache["index"]
        kv_seg = None
        if cache is not None:
            kv_seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids_BT.astype(jnp.int32),
                                                         cache_index, axis=1)
        new_layers_cache = None
        if cfg.scan_layers:
            layer_caches = None if cache is None else (cache["k"], cache["v"])
            stack = nn.scan(
                self._block_cls(scanned=True),
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, new_layers_cache = stack(cfg, name="layers")(x, layer_caches, positions_BT, segment_ids_BT, kv_seg, cache_index)
        else:
            block_cls = self._block_cls(scanned=False)
            new_k, new_v = [], []
            for i in range(cfg.n_layers):
                layer_cache = None if cache is None else (cache["k"][i], cache["v"][i], kv_seg)
                x, c = block_cls(cfg, name=f"layers_{i}")(x, positions_BT, segment_ids_BT, layer_cache,
                                                          cache_index)
                if c is not None:
                    new_k.append(c[0])
                    new_v.append(c[1])
            if cache is not None:
                new_layers_cache = (jnp.stack(new_k), jnp.stack(new_v))

        x = RMSNorm(cfg.norm_eps, cfg.param_dtype, name="norm")(x)
        new_cache = None
        if cache is not None:
            t = tokens_BT.shape[1]
            new_cache = {"k": new_layers_cache[0], "v": new_layers_cache[1], "segment_ids": kv_seg,
                         "index": cache_index + t}
        if return_hidden:
            return x, new_cache
        return self.logits(x), new_cache

    def logits(self, x_BTD):
        """Output head in the compute dtype with float32 accumulation; logits returned in float32."""
        cfg = self.cfg
        if cfg.tie_embeddings:
            table = self.variables["params"]["embed"]["embedding"]
            w = nn.meta.unbox(table).astype(x_BTD.dtype).T
        else:
            w = self.param("lm_head", nn.with_logical_partitioning(
                nn.initializers.normal(stddev=cfg.init_std), ("embed", "vocab")),
                (cfg.dim, cfg.vocab_size), jnp.dtype(cfg.param_dtype))
            w = nn.meta.unbox(w).astype(x_BTD.dtype)
        logits = jnp.einsum("btd,dv->btv", x_BTD, w, preferred_element_type=jnp.float32)
        return constrain(logits, ("act_batch", "act_length", "act_vocab"))


# ------------------------------------------------------------------------------------------ functional API


def _module(cfg: ModelConfig) -> Transformer:
    return Transformer(cfg)


def _dummy_tokens(cfg: ModelConfig):
    return jnp.zeros((1, 1), jnp.int32)


def _init_boxed(cfg: ModelConfig, rng):
    tokens = _dummy_tokens(cfg)
    return _module(cfg).init(rng, tokens, jnp.zeros_like(tokens), jnp.ones_like(tokens))["params"]


def init(cfg: ModelConfig, rng) -> Params:
    """Initialised float32 (param_dtype) parameters as a plain pytree (no partitioning boxes)."""
    return nn.meta.unbox(_init_boxed(cfg, rng))


def init_boxed_fn(cfg: ModelConfig):
    """`rng -> params` with logical-partitioning boxes kept, for sharded initialisation (eval_shape + jit)."""
    return lambda rng: _init_boxed(cfg, rng)


def param_logical_specs(cfg: ModelConfig):
    """Pytree (same structure as params) of logical PartitionSpecs; computed abstractly, nothing allocated."""
    boxed = jax.eval_shape(init_boxed_fn(cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(cfg: ModelConfig):
    """Pytree of jax.ShapeDtypeStruct for the parameters (no allocation)."""
    return jax.eval_shape(lambda r: init(cfg, r), jax.random.key(0))


def validate_tokens(cfg: ModelConfig, tokens) -> None:
    """Raises ValueError if concrete token ids fall outside [0, vocab_size). Tracers are not checked."""
    if isinstance(tokens, jax.core.Tracer):
        return
    arr = np.asarray(tokens)
    if arr.size == 0:
        raise ValueError("tokens is empty")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integer ids, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = hi if hi >= cfg.vocab_size else lo
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size}) of model {cfg.name!r}")


def default_positions(tokens_BT):
    b, t = tokens_BT.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


def apply(cfg: ModelConfig, params: Params, tokens, positions=None, segment_ids=None, cache=None,
          return_hidden: bool = False):
    """Runs the model; returns (float32 logits [B,T,V] or final hidden states [B,T,D], new cache or None)."""
    validate_tokens(cfg, tokens)
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tokens.shape}")
    if positions is None:
        positions = default_positions(tokens)
        if cache is not None:
            positions = positions + cache["index"]
    if segment_ids is None:
        segment_ids = jnp.ones_like(tokens)
    return _module(cfg).apply({"params": params}, tokens, jnp.asarray(positions, jnp.int32),
                              jnp.asarray(segment_ids, jnp.int32), cache, return_hidden)


def forward(cfg: ModelConfig, params: Params, tokens, positions=None, segment_ids=None) -> Array:
    """Float32 logits [batch, length, vocab]. `segment_ids` (0 = padding) keep packed documents apart."""
    return apply(cfg, params, tokens, positions, segment_ids)[0]


def output_embedding(cfg: ModelConfig, params: Params) -> Array:
    """The [D, V] output projection (the transposed embedding table when tied)."""
    return params["embed"]["embedding"].T if cfg.tie_embeddings else params["lm_head"]


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None):
    """Empty KV cache: k/v [L, B, S, K, Dh], per-slot segment ids [B, S] (0 = empty), write index."""
    dtype = jnp.dtype(dtype or cfg.dtype)
    shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.resolved_head_dim)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32), "index": jnp.zeros((), jnp.int32)}


# ------------------------------------------------------------------------------- scanned <-> per-layer trees


def unstack_layers(cfg: ModelConfig, params: Params) -> Params:
    """Scanned tree (`layers/block/...` with a leading L axis) -> per-layer tree (`layers_i/...`)."""
    out = {k: v for k, v in params.items() if k != "layers"}
    stacked = params["layers"]["block"]
    for i in range(cfg.n_layers):
        out[f"layers_{i}"] = jax.tree.map(lambda a, i=i: a[i], stacked)
    return out


def stack_layers(cfg: ModelConfig, params: Params) -> Params:
    """Per-layer tree (`layers_i/...`) -> scanned tree (`layers/block/...`)."""
    missing = [f"layers_{i}" for i in range(cfg.n_layers) if f"layers_{i}" not in params]
    if missing:
        raise ValueError(f"per-layer parameters missing: {missing[:3]}{'...' if len(missing) > 3 else ''}")
    out = {k: v for k, v in params.items() if not k.startswith("layers_")}
    layers = [params[f"layers_{i}"] for i in range(cfg.n_layers)]
    out["layers"] = {"block": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}
    return out
