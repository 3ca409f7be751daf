"""llama_jax native checkpoints and the convert / generate entry points."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from llama_jax import model
from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.infer import sampling, text
from llama_jax.interop import checkpoints, hf, native
from tests.interop.helpers import random_params, random_tokens, tiny_cfg

CFG = tiny_cfg(vocab_size=512)  # a byte-level tokenizer: 256 ranks + 256 specials
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def test_native_round_trip_and_bare_orbax_dirs(tmp_path):
    params = random_params(CFG)
    native.save(tmp_path / "n", CFG, params)
    cfg, loaded = native.load(tmp_path / "n")
    assert cfg == CFG
    tokens = random_tokens(CFG, (1, 20))
    np.testing.assert_array_equal(model.forward(cfg, loaded, tokens), model.forward(CFG, params, tokens))
    with ocp.StandardCheckpointer() as ckptr:  # a train-state-like tree holding params under "params"
        ckptr.save(tmp_path / "state", {"params": params, "step": np.int32(7), "opt": {"mu": params}})
    _, from_state = native.load(tmp_path / "state", cfg=CFG)
    np.testing.assert_array_equal(from_state["lm_head"], params["lm_head"])
    with pytest.raises(FileNotFoundError, match="pass cfg"):
        native.load(tmp_path / "state")
    with pytest.raises(ValueError, match=r"\['embed'\]\['embedding'\].*\(512, 64\).*\(512, 32\)"):
        native.load(tmp_path / "n" / "params", cfg=CFG.replace(dim=32))


def test_convert_cli_and_generate_cli(tmp_path):
    params = random_params(CFG, seed=4)
    hf.save(tmp_path / "hf", CFG, params)
    subprocess.run([sys.executable, "-m", "llama_jax.convert", "--from=hf", "--to=llama_jax",
                    f"--input={tmp_path / 'hf'}", f"--output={tmp_path / 'lj'}"], check=True, env=ENV)
    assert checkpoints.detect(tmp_path / "lj") == "llama_jax"
    checkpoints.convert(tmp_path / "lj", tmp_path / "hf2", None, "hf", dtype="bfloat16", weights_only=True)
    cfg2, params2 = hf.load(tmp_path / "hf2")
    assert cfg2.tie_embeddings == CFG.tie_embeddings and cfg2.ffn_dim == CFG.ffn_dim
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(jnp.bfloat16)), params2,
                 params)  # written in bf16, exactly the rounded weights

    tokenizer_lib.write_tiktoken_file(tmp_path / "lj" / "tokenizer.model", {bytes([i]): i for i in range(256)})
    tok = tokenizer_lib.Tokenizer.from_file(tmp_path / "lj" / "tokenizer.model")
    completion, gen = text.generate_text(str(tmp_path / "lj"), "Hello", max_new_tokens=5)
    expected = sampling.generate(CFG, params, [tok.encode("Hello", bos=True)], max_new_tokens=5,
                                 stop_ids=tok.stop_ids).tokens[0]
    assert gen.tokens[0] == expected and completion == tok.decode(expected)
    out = subprocess.run([sys.executable, "-m", "llama_jax.generate", f"--checkpoint={tmp_path / 'lj'}",
                          "--prompt=Hi there", "--chat", "--max_new_tokens=4", "--quantize=fp8"],
                         check=True, env=ENV, capture_output=True, text=True).stdout
    assert "tok/s decode" in out and "prompt tokens" in out
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        text.generate_text(str(tmp_path / "hf"), "Hello")
