"""Hugging Face interop: logits parity with transformers' LlamaForCausalLM, export/import round trips, errors."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llama_jax import model
from llama_jax.interop import hf
from tests.interop.helpers import random_params, random_tokens, tiny_cfg

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 96  # > original_max_position (32): the Llama 3.1 frequency blend matters


def hf_logits(folder, tokens):
    m = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    with torch.no_grad():
        return m(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tie):
    cfg = tiny_cfg(tie_embeddings=tie)
    params = random_params(cfg, seed=1)
    hf.save(tmp_path / "m", cfg, params, shard_size=40_000)
    files = os.listdir(tmp_path / "m")
    assert hf.INDEX_FILE in files and sum(f.endswith(".safetensors") for f in files) > 2
    tokens = random_tokens(cfg, (2, SEQ))
    ref = hf_logits(tmp_path / "m", tokens)
    ours = np.asarray(model.forward(cfg, params, tokens))
    assert np.abs(ours).max() > 1.0  # logits are not trivially small
    err = np.abs(ours - ref).max()
    assert err < 1e-4, err
    # The RoPE scaling is exercised: the same weights without it give different logits.
    unscaled = np.asarray(model.forward(cfg.replace(rope_scaling=None), params, tokens))
    assert np.abs(unscaled - ref).max() > 1e-3


def _transformers_folder(path, rope_form: str, tie: bool, head_dim=None):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32, "rope_theta": 500000.0}
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, rope_parameters=rope)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.15) if p.ndim > 1 else p.uniform_(0.7, 1.3)
    m.save_pretrained(path)
    if rope_form == "rope_scaling":  # the transformers 4.x form of config.json
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        c.pop("rope_parameters")
        c["rope_theta"] = rope.pop("rope_theta")
        c["rope_scaling"] = rope
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f)
    return m


@pytest.mark.parametrize("rope_form,tie,head_dim", [("rope_parameters", False, None),
                                                    ("rope_scaling", True, 32)])
def test_transformers_folder_loads_with_equal_logits(tmp_path, rope_form, tie, head_dim):
    m = _transformers_folder(tmp_path / "m", rope_form, tie, head_dim)
    cfg, params = hf.load(tmp_path / "m")
    assert cfg.tie_embeddings == tie and cfg.resolved_head_dim == (head_dim or 16)
    assert cfg.rope_scaling.original_max_position == 32 and cfg.rope_theta == 500000.0
    assert ("lm_head" in params) == (not tie)
    tokens = random_tokens(cfg, (2, SEQ), seed=3)
    with torch.no_grad():
        ref = m(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    err = np.abs(np.asarray(model.forward(cfg, params, tokens)) - ref).max()
    assert err < 1e-4, err


def test_round_trip_and_dtype(tmp_path):
    cfg = tiny_cfg()
    params = random_params(cfg)
    hf.save(tmp_path / "a", cfg, params)  # one shard: model.safetensors, no index
    assert sorted(os.listdir(tmp_path / "a")) == ["config.json", "model.safetensors"]
    cfg2, params2 = hf.load(tmp_path / "a")
    assert cfg2.replace(name=cfg.name, ffn_dim_override=None, multiple_of=cfg.multiple_of) == cfg
    tokens = random_tokens(cfg, (1, 40))
    np.testing.assert_array_equal(model.forward(cfg2, params2, tokens), model.forward(cfg, params, tokens))
    cfg16, params16 = hf.load(tmp_path / "a", dtype="bfloat16")
    assert params16["layers"]["block"]["attention"]["wq"].dtype == np.dtype("bfloat16")
    assert cfg16.param_dtype == "bfloat16"
    hf.save(tmp_path / "b", cfg, params, dtype="bfloat16")
    assert json.load(open(tmp_path / "b" / "config.json"))["dtype"] == "bfloat16"
    with pytest.raises(FileExistsError, match="not empty"):
        hf.save(tmp_path / "b", cfg, params)


def test_shape_mismatch_names_the_tensor(tmp_path):
    cfg = tiny_cfg()
    hf.save(tmp_path / "m", cfg, random_params(cfg))
    path = tmp_path / "m" / "config.json"
    c = json.load(open(path))
    c["intermediate_size"] = 128
    json.dump(c, open(path, "w"))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(192, 64\).*\(128, 64\)"):
        hf.load(tmp_path / "m")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    cfg = tiny_cfg()
    hf.save(tmp_path / "m", cfg, random_params(cfg))
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(f)
    tensors.pop("model.norm.weight")
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(tensors, f)
    with pytest.raises(ValueError, match=r"missing tensors \['model\.norm\.weight'\].*q_proj\.bias"):
        hf.load(tmp_path / "m")


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.load(tmp_path / "nope")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf.load(tmp_path / "empty")
    cfg = tiny_cfg()
    hf.save(tmp_path / "m", cfg, random_params(cfg), shard_size=50_000)
    shard = hf.weight_map(tmp_path / "m")["model.norm.weight"]
    os.remove(tmp_path / "m" / shard)
    with pytest.raises(FileNotFoundError, match=shard):
        hf.load(tmp_path / "m")
