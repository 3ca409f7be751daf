"""Model architecture: a frozen, typed ModelConfig and the Llama 3 / 3.1 / 3.2 presets.

No JAX here: this module is imported by configs, planners and converters that must stay light.
Numbers come from Meta's reference implementation (llama-models `sku_list.py`, `args.py`) and the paper
(arXiv 2407.21783, Table 3). The FFN width is computed with Meta's rule, never typed in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_qkv_out")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("xla", "xla_blocked", "xla_chunked", "cudnn", "splash", "auto")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1 frequency-dependent RoPE scaling (HF `rope_type: "llama3"`)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Llama 3 family model. Immutable; derive variants with `.replace(...)`."""

    name: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim_multiplier: float = 1.0
    multiple_of: int = 256
    head_dim: int | None = None  # default dim // n_heads
    ffn_dim_override: int | None = None  # only for workloads whose FFN width is given directly
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = False
    # Numerics and execution (do not change the function, only how it is computed).
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"  # master copy of the parameters
    remat: str = "none"
    scan_layers: bool = True
    attention: str = "auto"  # see llama_jax.model.attention; "xla" is the plain reference
    fuse_projections: bool = True  # Q/K/V and gate/up each as one matmul (same parameters, fewer larger GEMMs)
    init_std: float = 0.02

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        """A ModelConfig from its `dataclasses.asdict` form (a stage's model_config.json); unknown fields are an
        error naming them."""
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"model config has unknown field(s) {unknown}")
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def __post_init__(self):
        for field, allowed in (("remat", REMAT_POLICIES), ("dtype", DTYPES), ("param_dtype", DTYPES),
                               ("attention", ATTENTION_BACKENDS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"ModelConfig.{field}={getattr(self, field)!r}; expected one of {allowed}")
        for field in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads"):
            if getattr(self, field) <= 0:
                raise ValueError(f"ModelConfig.{field} must be positive, got {getattr(self, field)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim is None and self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}; set head_dim")
        if self.resolved_head_dim % 2:
            raise ValueError(f"head_dim={self.resolved_head_dim} must be even for RoPE")

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Meta's rule: h = 4·dim; h = ⌊2h/3⌋; h = ⌊multiplier·h⌋; round up to `multiple_of`."""
        if self.ffn_dim_override is not None:
            return self.ffn_dim_override
        h = int(2 * (4 * self.dim) / 3)
        h = int(self.ffn_dim_multiplier * h)
        return self.multiple_of * math.ceil(h / self.multiple_of)

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    def param_count(self) -> int:
        """Exact parameter count (embedding + blocks + final norm + untied head)."""
        d, hd, f = self.dim, self.resolved_head_dim, self.ffn_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        block = attn + 3 * d * f + 2 * d
        head = 0 if self.tie_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.n_layers * block + d + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), the figure MFU is computed from.

        Derivation (multiply-add = 2 FLOPs; backward = 2x forward, so training = 3x forward = 6 per weight):
          * every weight matrix W of shape [a, b] applied to one token costs 2ab forward, hence 6ab in training;
            summed over blocks and the output head this is 6·N_matmul with
            N_matmul = L·(d·hd·(2·H + 2·K) + 3·d·f) + V·d   (the embedding lookup is a gather, not a matmul);
          * attention scores QKᵀ and the weighted sum PV each cost 2·T·hd per head per token forward over a
            full T×T square; with the causal mask only half of it is useful work, so we count
            2 (QK and PV) · 2 (FLOPs per MAC) · H·hd·T / 2 forward = 2·H·hd·T, i.e. 6·L·H·hd·T in training.
        Total: 6·N_matmul + 6·L·H·hd·T. (This is the PaLM appendix-B convention with the causal halving used by
        torchtitan and MaxText; remat recomputation is not counted, so MFU is honest.)
        """
        d, hd, f = self.dim, self.resolved_head_dim, self.ffn_dim
        n_matmul = self.n_layers * (d * hd * (2 * self.n_heads + 2 * self.n_kv_heads) + 3 * d * f)
        n_matmul += self.vocab_size * d
        attention = self.n_layers * self.n_heads * hd * seq_len
        return 6.0 * n_matmul + 6.0 * attention


_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
_LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
LLAMA3_VOCAB = 128_256


def llama31_8b() -> ModelConfig:
    return ModelConfig(name="llama3.1-8b", vocab_size=LLAMA3_VOCAB, dim=4096, n_layers=32, n_heads=32,
                       n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=1024, rope_scaling=_LLAMA31_SCALING,
                       max_seq_len=131_072)


def llama31_70b() -> ModelConfig:
    return ModelConfig(name="llama3.1-70b", vocab_size=LLAMA3_VOCAB, dim=8192, n_layers=80, n_heads=64,
                       n_kv_heads=8, ffn_dim_multiplier=1.3, multiple_of=4096, rope_scaling=_LLAMA31_SCALING,
                       max_seq_len=131_072)


def llama31_405b() -> ModelConfig:
    return ModelConfig(name="llama3.1-405b", vocab_size=LLAMA3_VOCAB, dim=16384, n_layers=126, n_heads=128,
                       n_kv_heads=8, ffn_dim_multiplier=1.2, multiple_of=4096, rope_scaling=_LLAMA31_SCALING,
                       max_seq_len=131_072)


def llama32_1b() -> ModelConfig:
    return ModelConfig(name="llama3.2-1b", vocab_size=LLAMA3_VOCAB, dim=2048, n_layers=16, n_heads=32,
                       n_kv_heads=8, ffn_dim_multiplier=1.5, multiple_of=256, rope_scaling=_LLAMA32_SCALING,
                       max_seq_len=131_072, tie_embeddings=True)


def llama32_3b() -> ModelConfig:
    return ModelConfig(name="llama3.2-3b", vocab_size=LLAMA3_VOCAB, dim=3072, n_layers=28, n_heads=24,
                       n_kv_heads=8, ffn_dim_multiplier=1.0, multiple_of=256, rope_scaling=_LLAMA32_SCALING,
                       max_seq_len=131_072, tie_embeddings=True)


def llama3_8b() -> ModelConfig:
    """Llama 3.0 8B: 8K context, no RoPE scaling."""
    return llama31_8b().replace(name="llama3-8b", rope_scaling=None, max_seq_len=8192)


def tiny() -> ModelConfig:
    """A CPU-sized Llama 3 (same block design, 3.1 RoPE scaling, GQA 2:1) for the main job and tests.

    vocab 4096 matches the embedded default tokenizer (3840 BPE ranks + 256 special tokens).
    """
    return ModelConfig(name="tiny", vocab_size=4096, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
                       ffn_dim_multiplier=1.0, multiple_of=64, rope_scaling=RopeScaling(
                           factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=256),
                       max_seq_len=2048)


def tiny_bench() -> ModelConfig:
    """The fixed "tiny-bench" throughput workload (see benchmarks/README.md)."""
    return ModelConfig(name="tiny-bench", vocab_size=32_000, dim=256, n_layers=4, n_heads=8, n_kv_heads=2,
                       ffn_dim_override=704, rope_theta=500_000.0, max_seq_len=512)


PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "llama3-8b": llama3_8b,
    "llama3.1-8b": llama31_8b,
    "llama3.1-70b": llama31_70b,
    "llama3.1-405b": llama31_405b,
    "llama3.2-1b": llama32_1b,
    "llama3.2-3b": llama32_3b,
    "tiny": tiny,
    "tiny-bench": tiny_bench,
}


def get(name: str, **overrides) -> ModelConfig:
    """Returns the preset `name`, optionally with fields replaced; unknown names raise a clear error."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
    cfg = PRESETS[name]()
    unknown = set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise ValueError(f"unknown ModelConfig field(s) {sorted(unknown)} for preset {name!r}")
    return cfg.replace(**overrides) if overrides else cfg
