"""Decode throughput of the KV-cache sampler: tokens/s at batch 1 and 8, exact (f32 / bf16) vs FP8.

    python benchmarks/decode.py [--preset=tiny] [--prompt_len=64] [--new_tokens=128] [--repeats=3]

Random-init weights (throughput does not depend on them), greedy decoding with no stop ids, so every run
generates exactly `new_tokens` per sequence. Each configuration is compiled once (reported apart) and timed
`repeats` times; the median decode tokens/s (all sequences) is printed as a Markdown table row.
On CPU the FP8 path is an emulation (no fp8 units: the float8 operands are upcast), so it measures the
overhead of the quantize/dequantize work, not the speed-up FP8 GEMMs give on H100-class GPUs.
"""

import statistics

import jax
import numpy as np
from absl import app, flags

from llama_jax import model
from llama_jax.infer import quant, sampling
from llama_jax.model import config

_PRESET = flags.DEFINE_string("preset", "tiny", "Model preset.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per configuration.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes of the exact model.")


def main(argv):
    del argv
    base = config.get(_PRESET.value)
    params = jax.jit(model.init, static_argnums=0)(base, jax.random.key(0))
    rng = np.random.default_rng(0)
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), preset {base.name}, "
          f"prompt {_PROMPT_LEN.value}, new tokens {_NEW.value}")
    print("| batch | model | compile s | prefill tok/s | decode tok/s |")
    print("|------:|-------|----------:|--------------:|-------------:|")
    for batch in map(int, _BATCHES.value):
        prompts = rng.integers(0, base.vocab_size, (batch, _PROMPT_LEN.value)).tolist()
        for dtype in _DTYPES.value:
            for quantize in (None, "fp8"):
                cfg = base.replace(dtype=dtype)
                p = params
                if quantize:
                    cfg, p = quant.quantize_params(cfg, params)
                runs = [sampling.generate(cfg, p, prompts, max_new_tokens=_NEW.value, quantize=quantize)
                        for _ in range(_REPEATS.value)]
                name = f"{dtype}{' + fp8 FFN' if quantize else ''}"
                print(f"| {batch} | {name} | {runs[0].compile_s:.1f} | "
                      f"{statistics.median(r.prefill_tokens_per_s for r in runs):,.0f} | "
                      f"{statistics.median(r.decode_tokens_per_s for r in runs):,.0f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
