"""`convert` onto a full disk: one error line naming the output, nothing half-written left, and a second try
(with space) succeeds. A write in the middle of each save raises ENOSPC."""

import errno
import os
import subprocess
import sys
import textwrap

import pytest

from llama_jax.data import tokenizer as tokenizer_lib
from llama_jax.interop import checkpoints, native
from tests.interop.helpers import random_params, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "",
       "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}

# Runs `python -m llama_jax.convert ARGS` with the write `sys.argv[1]` (module:attribute#N) failing with ENOSPC on
# its N-th call, once the output is partly written.
_CONVERT_ON_A_FULL_DISK = textwrap.dedent("""
    import errno, importlib, os, runpy, sys
    target, failing_call = sys.argv[1].split("#")
    module, attribute = target.split(":")
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    real, calls = getattr(owner, name), []
    def full_disk(*args, **kwargs):
        calls.append(1)
        if len(calls) == int(failing_call):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    setattr(owner, name, full_disk)
    sys.argv = ["convert", *sys.argv[2:]]
    runpy.run_module("llama_jax.convert", run_name="__main__")
""")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A llama_jax checkpoint with a byte-level tokenizer (256 ranks + 256 specials)."""
    path = tmp_path_factory.mktemp("src") / "lj"
    cfg = tiny_cfg(vocab_size=512)
    native.save(path, cfg, random_params(cfg))
    tokenizer_lib.write_tiktoken_file(path / "tokenizer.model", {bytes([i]): i for i in range(256)})
    return str(path)


@pytest.mark.parametrize("fmt,output,failing_write", [
    ("llama_jax", "out", "llama_jax.data.tokenizer:Tokenizer.save#1"),  # after params/ and model_config.json
    ("hf", "out", "llama_jax.interop.hf:save_file#2"),  # the second safetensors shard
    ("gguf", "out.gguf", "gguf:GGUFWriter.write_tensor_data#2"),  # the second tensor
])
def test_convert_onto_a_full_disk(tmp_path, source, fmt, output, failing_write):
    args = ["--from=llama_jax", f"--to={fmt}", f"--input={source}", f"--output={output}", "--shard_size=20000"]
    proc = subprocess.run([sys.executable, "-c", _CONVERT_ON_A_FULL_DISK, failing_write, *args], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llama_jax: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0] == (f"llama_jax: error: could not write {tmp_path / output} ({os.strerror(errno.ENOSPC)}); "
                         "nothing was written"), errors[0]
    assert os.listdir(tmp_path) == []  # neither the output nor its staging folder
    checkpoints.convert(source, tmp_path / output, "llama_jax", fmt, shard_size=20000)  # the retry is not refused
    assert os.listdir(tmp_path) == [output]
    if fmt != "gguf":
        assert checkpoints.load(tmp_path / output)[0].vocab_size == 512
