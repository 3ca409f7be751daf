"""Converts checkpoints between formats.

    python -m llama_jax.convert --from=hf|meta|llama_jax --to=hf|llama_jax|gguf --input=DIR --output=DIR|FILE \
        [--dtype=float32|bfloat16|float16|q8_0] [--shard_size=5GB] [--tokenizer=PATH] [--weights_only]

--to=hf and --to=gguf (one .gguf file; q8_0 only here) carry the tokenizer: --tokenizer, else the one in the
input folder; with neither, the export stops and says where it looked, unless --weights_only.
See `llama_jax.interop.checkpoints` for what streams and the memory needed.
"""

import os

from absl import flags

from llama_jax import cli
from llama_jax.interop import checkpoints, hf

_FROM = flags.DEFINE_enum("from", None, list(checkpoints.FORMATS), "Input checkpoint format.")
_TO = flags.DEFINE_enum("to", None, list(checkpoints.WRITABLE), "Output checkpoint format.")
_INPUT = flags.DEFINE_string("input", None, "Input checkpoint directory.")
_OUTPUT = flags.DEFINE_string("output", None, "Output checkpoint directory (must not exist or be empty); "
                              "a .gguf file for --to=gguf.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16", "q8_0"],
                           "Dtype of the written params (q8_0: --to=gguf only).")
_SHARD_SIZE = flags.DEFINE_string("shard_size", "5GB", "Maximum safetensors shard size for --to=hf.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer to export (tokenizer.model or tokenizer.json); "
                                 "default: the one in --input.")
_WEIGHTS_ONLY = flags.DEFINE_bool("weights_only", False, "Export without a tokenizer.")
flags.mark_flags_as_required(["from", "to", "input", "output"])
cli.nonempty(_INPUT, _OUTPUT, _TOKENIZER)


def _positive_size(size: str) -> bool:
    try:
        hf.parse_size(size)
    except ValueError:
        return False
    return True


cli.validate(_SHARD_SIZE, _positive_size, "a positive byte count such as 5GB, 500MB or 1000000")


def main():
    cli.check_output_dir(_OUTPUT.value, "--output")
    if os.path.isdir(_OUTPUT.value) and os.listdir(_OUTPUT.value):
        raise FileExistsError(f"--output={_OUTPUT.value} exists and is not empty; remove it or choose another folder")
    cfg = checkpoints.convert(_INPUT.value, _OUTPUT.value, _FROM.value, _TO.value, dtype=_DTYPE.value,
                              shard_size=_SHARD_SIZE.value, tokenizer=_TOKENIZER.value,
                              weights_only=_WEIGHTS_ONLY.value)
    print(f"wrote {_TO.value} checkpoint of {cfg.name!r} ({cfg.param_count():,} parameters) to {_OUTPUT.value}")


if __name__ == "__main__":
    cli.run(main)
