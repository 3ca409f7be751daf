"""Meta consolidated checkpoints: a random tiny model in Meta's layout (interleaved RoPE, 2 model-parallel
shards) is imported and must give the logits of a PyTorch transcription of Meta's reference forward."""

import json
import math
import sys

import numpy as np
import pytest

from llama_jax import model
from llama_jax.interop import meta

torch = pytest.importorskip("torch")

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 256, "ffn_dim_multiplier": 1.0,
          "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True}
FFN = 192  # Meta's rule: 4*64 -> 170 -> round up to 32


def meta_state_dict(seed=0):
    g = torch.Generator().manual_seed(seed)
    d, h, k, dh, v = 64, 4, 2, 16, 256

    def w(*shape, std=0.15):
        return torch.randn(*shape, generator=g) * std

    sd = {"tok_embeddings.weight": w(v, d), "norm.weight": 1 + w(d, std=0.3), "output.weight": w(v, d)}
    for i in range(2):
        sd.update({f"layers.{i}.attention.wq.weight": w(h * dh, d), f"layers.{i}.attention.wk.weight": w(k * dh, d),
                   f"layers.{i}.attention.wv.weight": w(k * dh, d), f"layers.{i}.attention.wo.weight": w(d, h * dh),
                   f"layers.{i}.feed_forward.w1.weight": w(FFN, d), f"layers.{i}.feed_forward.w3.weight": w(FFN, d),
                   f"layers.{i}.feed_forward.w2.weight": w(d, FFN),
                   f"layers.{i}.attention_norm.weight": 1 + w(d, std=0.3),
                   f"layers.{i}.ffn_norm.weight": 1 + w(d, std=0.3)})
    return sd


def apply_scaling(freqs):  # Meta's llama-models `apply_scaling`
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8, 1, 4, 8192
    low_freq_wavelen, high_freq_wavelen = old_context_len / low_freq_factor, old_context_len / high_freq_factor
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / scale_factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / scale_factor + smooth * freq)
    return torch.tensor(out, dtype=freqs.dtype)


def meta_reference_logits(sd, tokens):
    """Meta's reference Llama 3 forward (complex interleaved RoPE, repeat_kv GQA), float32, no cache."""
    h, k, dh, eps = 4, 2, 16, 1e-5
    freqs = apply_scaling(1.0 / (500000.0 ** (torch.arange(0, dh, 2)[: dh // 2].float() / dh)))
    t = torch.arange(tokens.shape[1], dtype=torch.float32)
    freqs_cis = torch.polar(torch.ones(t.shape[0], dh // 2), torch.outer(t, freqs))

    def rope(x):
        xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def norm(x, wgt):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * wgt

    x = sd["tok_embeddings.weight"][tokens]
    b, s = tokens.shape
    mask = torch.triu(torch.full((s, s), float("-inf")), diagonal=1)
    for i in range(2):
        p = lambda n: sd[f"layers.{i}.{n}.weight"]  # noqa: E731
        hn = norm(x, p("attention_norm"))
        q = rope((hn @ p("attention.wq").T).view(b, s, h, dh))
        kk = rope((hn @ p("attention.wk").T).view(b, s, k, dh)).repeat_interleave(h // k, dim=2)
        vv = (hn @ p("attention.wv").T).view(b, s, k, dh).repeat_interleave(h // k, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, kk) / math.sqrt(dh) + mask
        out = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), vv).reshape(b, s, h * dh)
        x = x + out @ p("attention.wo").T
        hn = norm(x, p("ffn_norm"))
        x = x + (torch.nn.functional.silu(hn @ p("feed_forward.w1").T) * (hn @ p("feed_forward.w3").T)) @ \
            p("feed_forward.w2").T
    return (norm(x, sd["norm.weight"]) @ sd["output.weight"].T).numpy()


def write_meta_checkpoint(path, sd, n_shards=2, embedding_axis=0):
    """Splits like fairscale: column-parallel on dim 0, row-parallel (wo, w2) on dim 1, norms replicated."""
    path.mkdir()
    shards = [{} for _ in range(n_shards)]
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            parts = [t.clone() for _ in range(n_shards)]
        else:
            axis = 1 if name.endswith(("wo.weight", "w2.weight")) else 0
            axis = embedding_axis if name == "tok_embeddings.weight" else axis
            parts = [c.clone() for c in torch.chunk(t, n_shards, dim=axis)]
        for shard, part in zip(shards, parts):
            shard[name] = part
    for i, shard in enumerate(shards):
        torch.save(shard, path / f"consolidated.{i:02d}.pth")
    (path / "params.json").write_text(json.dumps(PARAMS))


@pytest.mark.parametrize("embedding_axis", [0, 1])  # Llama 3 VocabParallelEmbedding / Llama 2 ParallelEmbedding
def test_meta_import_matches_reference_forward(tmp_path, embedding_axis, monkeypatch):
    sd = meta_state_dict()
    write_meta_checkpoint(tmp_path / "ckpt", sd, embedding_axis=embedding_axis)
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)  # the import reads torch's files without torch
        cfg, params = meta.load(tmp_path / "ckpt")
    assert cfg.ffn_dim == FFN and cfg.rope_scaling is not None and not cfg.tie_embeddings
    tokens = np.random.default_rng(0).integers(0, 256, (2, 48))
    ref = meta_reference_logits(sd, torch.tensor(tokens))
    ours = np.asarray(model.forward(cfg, params, tokens))
    err = np.abs(ours - ref).max()
    assert np.abs(ref).max() > 1.0 and err < 1e-4, err


def test_permutation_round_trip_and_layout():
    w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads, head_dim 8
    hf_w = meta.interleaved_to_rotate_half(w, 2)
    np.testing.assert_array_equal(meta.rotate_half_to_interleaved(hf_w, 2), w)
    # Head 0: Meta rows (0,1),(2,3),.. pair up; rotate-half puts evens first, then odds.
    np.testing.assert_array_equal(hf_w[:8, 0], w[[0, 2, 4, 6, 1, 3, 5, 7], 0])


def test_mismatched_shards_are_named(tmp_path):
    sd = meta_state_dict()
    sd.pop("layers.1.ffn_norm.weight")
    write_meta_checkpoint(tmp_path / "ckpt", sd)
    with pytest.raises(ValueError, match=r"consolidated\.00\.pth.*layers\.1\.ffn_norm\.weight"):
        meta.load(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="params.json"):
        meta.load(tmp_path)
