"""GGUF export for llama.cpp / Ollama, written with the maintained `gguf` package (llama.cpp's gguf-py).

    save(path, cfg, params, tokenizer=None, outtype="float32")     one .gguf file, written atomically
    rope_freq_factors(cfg) -> [head_dim // 2] float32 | None        the 3.1 scaling as llama.cpp's `rope_freqs`
    OUT_TYPES: float32 | float16 | bfloat16 | q8_0

What goes in (the layout of llama.cpp's `convert_hf_to_gguf.py` for `LlamaForCausalLM`):
- metadata `general.architecture = llama` and `llama.{vocab_size, context_length, embedding_length,
  block_count, feed_forward_length, attention.head_count, attention.head_count_kv, attention.key_length,
  attention.value_length, attention.layer_norm_rms_epsilon, rope.freq_base, rope.dimension_count}`,
  `general.file_type`, `general.quantization_version`;
- Llama 3.1 frequency scaling as the tensor `rope_freqs.weight`: per frequency pair the divisor llama.cpp applies
  to the rotation angle (1 above the high-frequency wavelength, `factor` below the low-frequency one, the
  smooth blend in between), so a model without scaling has no such tensor;
- tensors `token_embd`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up,
  ffn_down}`, `output_norm`, `output` (absent when the head is tied), in HF's [out, in] orientation with the
  q / k rows permuted from rotate-half back to Meta's interleaved pairs (llama.cpp's "normal" RoPE);
- the tokenizer: `tokenizer.ggml.model = gpt2`, `pre = llama-bpe` (Llama 3's regex), the byte-level tokens,
  their types (specials are CONTROL), the BPE merges of `hf_tokenizer.vocab_and_merges`, BOS / EOS / EOT / EOM /
  pad ids, `add_bos_token`, and the chat template.

Types: 1-D tensors (norms, rope_freqs) stay float32, as in llama.cpp; with q8_0 every 2-D tensor is Q8_0 (rows
must be a multiple of 32, else that tensor is written float16, as llama.cpp's converter does).

Memory: tensor infos are written first from the config's shapes, then one tensor at a time is converted and
appended, so peak host memory beyond the params is about one tensor.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator

import gguf as gguf_lib
import numpy as np

from llama_jax.data.tokenizer import Tokenizer, token_bytes_to_hf
from llama_jax.interop import hf, hf_tokenizer, meta
from llama_jax.model.config import ModelConfig

Params = Any
_Q = gguf_lib.GGMLQuantizationType
_F = gguf_lib.LlamaFileType
OUT_TYPES = {"float32": (_Q.F32, _F.ALL_F32), "float16": (_Q.F16, _F.MOSTLY_F16),
             "bfloat16": (_Q.BF16, _F.MOSTLY_BF16), "q8_0": (_Q.Q8_0, _F.MOSTLY_Q8_0)}

# HF per-layer tensor name -> GGUF name after "blk.N."
LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
ROPE_FREQS = "rope_freqs.weight"


def gguf_name(hf_name: str) -> str:
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.N.rest
    return f"blk.{layer}.{LAYER_NAMES[rest]}"


def rope_freq_factors(cfg: ModelConfig) -> np.ndarray | None:
    """llama.cpp's `rope_freqs`: the angle of frequency pair i is divided by factor i (None without scaling)."""
    s = cfg.rope_scaling
    if s is None:
        return None
    dh = cfg.resolved_head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(s.factor)
        else:
            smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
            out.append(1.0 / ((1 - smooth) / s.factor + smooth))
    return np.asarray(out, np.float32)


def tensor_type(shape: tuple[int, ...], outtype: str) -> gguf_lib.GGMLQuantizationType:
    qtype = OUT_TYPES[outtype][0]
    if len(shape) <= 1:
        return _Q.F32
    block = gguf_lib.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else _Q.F16


def _tensor_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    plan = [(gguf_name(n), s) for n, s in hf.hf_shapes(cfg).items()]
    if cfg.rope_scaling is not None:
        plan.insert(0, (ROPE_FREQS, (cfg.resolved_head_dim // 2,)))
    return plan


def iter_tensors(cfg: ModelConfig, params: Params) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array in llama.cpp's layout) in the order of `_tensor_plan`."""
    factors = rope_freq_factors(cfg)
    if factors is not None:
        yield ROPE_FREQS, factors
    for name, arr in hf.iter_hf_tensors(cfg, params, dtype="float32"):
        if name.endswith("q_proj.weight"):
            arr = meta.rotate_half_to_interleaved(arr, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            arr = meta.rotate_half_to_interleaved(arr, cfg.n_kv_heads)
        yield gguf_name(name), np.ascontiguousarray(arr)


def _add_metadata(w: gguf_lib.GGUFWriter, cfg: ModelConfig, outtype: str) -> None:
    w.add_name(cfg.name)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_key_length(cfg.resolved_head_dim)
    w.add_value_length(cfg.resolved_head_dim)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_rope_dimension_count(cfg.resolved_head_dim)
    w.add_file_type(OUT_TYPES[outtype][1])
    w.add_quantization_version(gguf_lib.GGML_QUANT_VERSION)


def _add_tokenizer(w: gguf_lib.GGUFWriter, tok: Tokenizer, vocab_size: int) -> None:
    ranks = tok.model._mergeable_ranks  # pylint: disable=protected-access
    by_id = sorted(ranks.items(), key=lambda kv: kv[1])
    tokens = [token_bytes_to_hf(t) for t, _ in by_id]
    types = [gguf_lib.TokenType.NORMAL] * len(tokens)
    for text, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1]):
        tokens.append(text)
        types.append(gguf_lib.TokenType.CONTROL)
    for i in range(len(tokens), vocab_size):  # the model's vocabulary may be padded beyond the tokenizer
        tokens.append(f"[PAD{i}]")
        types.append(gguf_lib.TokenType.UNUSED)
    _, merges = hf_tokenizer.vocab_and_merges(ranks)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_eot_token_id(tok.eot_id)
    w.add_eom_token_id(tok.eom_id)
    w.add_pad_token_id(tok.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_chat_template(hf_tokenizer.CHAT_TEMPLATE)


def save(path: str | os.PathLike, cfg: ModelConfig, params: Params, tokenizer: Tokenizer | None = None,
         outtype: str = "float32", overwrite: bool = False) -> None:
    """Writes `path` (a .gguf file) for llama.cpp; see the module docstring for its contents.

    Without `tokenizer` the file holds the weights and architecture only (llama.cpp then needs a vocabulary
    from elsewhere). The file is written in a staging folder beside it and renamed into place
    (`llama_jax.interop.hf.staging`), so an interrupted or failed save (a full disk) leaves nothing behind.
    """
    path = os.path.abspath(os.fspath(path))
    if outtype not in OUT_TYPES:
        raise ValueError(f"GGUF type {outtype!r} is not supported; expected one of {sorted(OUT_TYPES)}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"GGUF output {path!r} is a directory; give a file path such as model.gguf")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path!r} exists; pass overwrite=True to replace it")
    if tokenizer is not None and tokenizer.n_words > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.n_words} ids but model {cfg.name!r} has a vocabulary of "
                         f"{cfg.vocab_size}")
    hf._check_params(cfg, params)  # pylint: disable=protected-access
    plan = _tensor_plan(cfg)
    with hf.staging(path, file=True) as tmp:
        writer = gguf_lib.GGUFWriter(os.path.join(tmp, os.path.basename(path)), "llama")
        _add_metadata(writer, cfg, outtype)
        if tokenizer is not None:
            _add_tokenizer(writer, tokenizer, cfg.vocab_size)
        for name, shape in plan:
            qtype = tensor_type(shape, outtype)
            byte_shape = gguf_lib.quant_shape_to_byte_shape(shape, qtype)
            writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for (want_name, shape), (name, arr) in zip(plan, iter_tensors(cfg, params), strict=True):
            if name != want_name or arr.shape != shape:
                raise AssertionError(f"GGUF tensor order: got {name} {arr.shape}, planned {want_name} {shape}")
            data = gguf_lib.quants.quantize(arr, tensor_type(shape, outtype))
            writer.write_tensor_data(np.ascontiguousarray(data).view(np.uint8))
        writer.close()
