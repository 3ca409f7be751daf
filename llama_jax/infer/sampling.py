"""Batched generation with a preallocated KV cache: one jitted prefill, then a `lax.while_loop` decode.

    generate(cfg, params, prompts, max_new_tokens=..., temperature=0.0, top_k=0, top_p=1.0, seed=0,
             stop_ids=(), quantize=None) -> Generation
    sample_logits(logits, key, temperature, top_k, top_p) -> token ids

Layout: prompts of different lengths are **left-padded** to a common length P (rounded up to a multiple of 8
so that nearby lengths share a compiled program). Pad slots carry segment id 0 and real tokens segment id 1,
and positions count from 0 at each prompt's first real token, so every sequence sees exactly its own tokens.
The cache holds P + max_new_tokens slots; prefill writes slots [0, P), decode step t writes slot P + t.
All shapes are static: one compilation per (batch, P, max_new_tokens, sampling settings).

Sampling: temperature 0 is greedy (argmax). Otherwise logits / temperature, then top-k (keep the k largest),
then top-p (keep the smallest set of most likely tokens whose probability reaches p), then a categorical draw
with `jax.random.fold_in(key(seed), step)`. A sequence is done once it emits any id in `stop_ids` (the stop
id is not included in its output) or after `max_new_tokens`; the loop ends early when all are done.

Sharded params are passed through untouched: jit follows the shardings the arrays already carry (this
module builds no mesh). `quantize="fp8"` runs the FP8 row-wise model of `llama_jax.infer.quant`.

Timing: compilation is done ahead of time and reported separately (`compile_s`), so `prefill_tokens_per_s`
(real prompt tokens / prefill wall time) and `decode_tokens_per_s` (generated tokens, all sequences, / decode
wall time) measure execution only.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import model
from llama_jax.infer import quant as quant_lib
from llama_jax.model.config import ModelConfig

Params = Any
PAD_MULTIPLE = 8


@dataclasses.dataclass
class Generation:
    """Result of `generate`: generated ids per prompt (stop id excluded) and timing."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop id was produced) or "length" (max_new_tokens reached)
    prompt_tokens: int
    generated_tokens: int
    compile_s: float
    prefill_s: float
    decode_s: float

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        return self.generated_tokens / self.decode_s if self.decode_s > 0 else float("nan")


# --------------------------------------------------------------------------------------------- sampling


def sample_logits(logits_BV, key, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Next-token ids [B] from float32 logits [B, V]. temperature <= 0 means greedy."""
    logits_BV = logits_BV.astype(jnp.float32)
    if temperature <= 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV / temperature
    neg = jnp.finfo(jnp.float32).min
    if top_k and top_k < logits_BV.shape[-1]:
        kth = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth, neg, logits_BV)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits_BV, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = mass_before < top_p  # the first token is always kept
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits_BV = jnp.where(logits_BV < threshold, neg, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int = 0):
    """(tokens, positions, segment_ids) [B, length] for left-padded prompts (see module docstring)."""
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    positions = np.zeros((b, length), np.int32)
    segments = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
        n = len(p)
        tokens[i, length - n:] = p
        positions[i, length - n:] = np.arange(n)
        segments[i, length - n:] = 1
    return tokens, positions, segments


# ------------------------------------------------------------------------------------- jitted programs


def _last_logits(cfg: ModelConfig, params: Params, hidden_BTD):
    """Logits of the last position only (the head of `Transformer.logits`, without a [B, P, V] tensor)."""
    x = hidden_BTD[:, -1:, :]
    w = model.transformer.output_embedding(cfg, params).astype(x.dtype)
    return jnp.einsum("btd,dv->btv", x, w, preferred_element_type=jnp.float32)[:, 0]


def _prefill(params, tokens, positions, segments, key, *, cfg, apply_fn, cache_len, cache_dtype, temperature,
             top_k, top_p):
    cache = model.init_cache(cfg, tokens.shape[0], cache_len, cache_dtype)
    hidden, cache = apply_fn(cfg, params, tokens, positions, segments, cache, return_hidden=True)
    logits = _last_logits(cfg, params, hidden)
    first = sample_logits(logits, jax.random.fold_in(key, 0), temperature, top_k, top_p)
    return first, cache, logits


def _decode(params, cache, first, next_pos, key, stop_ids, *, cfg, apply_fn, max_new_tokens, temperature, top_k,
            top_p):
    b = first.shape[0]
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, stop_ids)
    lengths = jnp.where(done, 0, 1).astype(jnp.int32)

    def cond(state):
        step, _, _, _, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(state):
        step, cache, tok, pos, done, out, lengths = state
        hidden, cache = apply_fn(cfg, params, tok[:, None], pos[:, None], jnp.ones((b, 1), jnp.int32), cache,
                                 return_hidden=True)
        logits = _last_logits(cfg, params, hidden)
        nxt = sample_logits(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)
        nxt = jnp.where(done, 0, nxt)
        out = jax.lax.dynamic_update_slice_in_dim(out, nxt[:, None], step, axis=1)
        stop = jnp.isin(nxt, stop_ids)
        lengths = lengths + jnp.where(done | stop, 0, 1)
        return step + 1, cache, nxt, pos + 1, done | stop, out, lengths

    state = (jnp.int32(1), cache, first, next_pos, done, out, lengths)
    step, _, _, _, done, out, lengths = jax.lax.while_loop(cond, body, state)
    return out, lengths, done, step


_COMPILED: dict = {}


def _signature(args):
    leaves, treedef = jax.tree.flatten(args)
    return treedef, tuple((np.shape(x), getattr(x, "dtype", type(x)), getattr(x, "sharding", None)) for x in leaves)


def _compiled(fn, static: dict, args: tuple):
    """AOT-compiles `fn(*args, **static)` once per (static settings, argument shapes/dtypes/shardings)."""
    key = (fn.__name__, tuple(sorted(static.items(), key=lambda kv: kv[0])), _signature(args))
    if key not in _COMPILED:
        jitted = jax.jit(functools.partial(fn, **static))
        _COMPILED[key] = jitted.lower(*args).compile()
    return _COMPILED[key]


# ----------------------------------------------------------------------------------------------- public


def generate(cfg: ModelConfig, params: Params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: Sequence[int] = (), quantize: str | None = None, pad_id: int = 0,
             cache_dtype=None) -> Generation:
    """Generates up to `max_new_tokens` ids after each prompt (lists of ids, lengths may differ)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt and every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_k must be >= 0 and 0 < top_p <= 1; got top_k={top_k}, top_p={top_p}")
    for i, p in enumerate(prompts):
        bad = [t for t in p if not 0 <= int(t) < cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {cfg.vocab_size})")
    bad_stop = [s for s in stop_ids if not 0 <= int(s) < cfg.vocab_size]
    if bad_stop:
        raise ValueError(f"stop id {bad_stop[0]} is outside the vocabulary [0, {cfg.vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the model's "
                         f"max_seq_len {cfg.max_seq_len}")
    if quantize not in (None, "", "none", "fp8"):
        raise ValueError(f"quantize={quantize!r}; expected None or 'fp8'")
    already_quantized = not cfg.scan_layers and quant_lib.is_quantized(params)
    if quantize == "fp8" and not already_quantized:
        cfg, params = quant_lib.quantize_params(cfg, params)
    apply_fn = quant_lib.apply if quantize == "fp8" or already_quantized else model.apply

    p_len = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    tokens, positions, segments = left_pad(prompts, p_len, pad_id)
    lengths_in = np.array([len(p) for p in prompts], np.int32)
    key = jax.random.key(seed)
    stops = jnp.asarray(np.array(sorted({int(s) for s in stop_ids}) or [-1], np.int32))
    cache_dtype = jnp.dtype(cache_dtype or cfg.dtype)
    sampling = dict(temperature=float(temperature), top_k=int(top_k), top_p=float(top_p))

    t0 = time.perf_counter()
    prefill_args = (params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segments), key)
    prefill = _compiled(_prefill, dict(cfg=cfg, apply_fn=apply_fn, cache_len=p_len + max_new_tokens,
                                       cache_dtype=cache_dtype, **sampling), prefill_args)
    compile_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    first, cache, _ = prefill(*prefill_args)
    first.block_until_ready()
    prefill_s = time.perf_counter() - t0

    decode_args = (params, cache, first, jnp.asarray(lengths_in), key, stops)
    t0 = time.perf_counter()
    decode = _compiled(_decode, dict(cfg=cfg, apply_fn=apply_fn, max_new_tokens=max_new_tokens, **sampling),
                       decode_args)
    compile_s += time.perf_counter() - t0

    t0 = time.perf_counter()
    out, lengths, done, _ = decode(*decode_args)
    out = np.asarray(out)
    decode_s = time.perf_counter() - t0

    lengths, done = np.asarray(lengths), np.asarray(done)
    results = [out[i, :lengths[i]].tolist() for i in range(len(prompts))]
    return Generation(tokens=results, finish_reasons=["stop" if d else "length" for d in done],
                      prompt_tokens=int(lengths_in.sum()), generated_tokens=int(lengths.sum()),
                      compile_s=compile_s, prefill_s=prefill_s, decode_s=decode_s)
