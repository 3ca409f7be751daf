"""Decode speed of `llama_jax.infer.sampling.generate` against Hugging Face transformers' `generate` (static KV
cache) on the same weights, on this machine, side by side in one run.

    python benchmarks/decode_vs_hf.py [--preset=tiny-bench] [--prompt_len=64] [--new_tokens=128] [--repeats=3]

The model is `--preset` with random weights (speed does not depend on them), exported once with
`llama_jax.interop.hf.save` and loaded by `transformers.LlamaForCausalLM` (float32, sdpa attention, eager,
torch threads = usable cores). Both decode greedily with no stop id, so every sequence gets exactly
`new_tokens` tokens. Per batch size (1 and 8, equal-length random prompts):

  * llama_jax: compiled ahead of time once (reported apart), then `repeats` timed calls; its `Generation` reports
    the prefill and the decode loop separately.
  * transformers: one warm-up call, then `repeats` timed calls of `generate(max_new_tokens=new_tokens)` and of
    `generate(max_new_tokens=1)` (prefill and the first token); decode time = the difference.

Printed: decode tokens/s (generated tokens of all sequences per second of the decode loop), end-to-end tokens/s
(generated tokens / prefill + decode), the ratio llama_jax / transformers for both, and how many of the greedy
tokens agree (same weights, float32: they agree until round-off flips a near-tie).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from llama_jax import model  # noqa: E402
from llama_jax.infer import sampling  # noqa: E402
from llama_jax.interop import hf  # noqa: E402
from llama_jax.model import config  # noqa: E402

_PRESET = flags.DEFINE_string("preset", "tiny-bench", "Model preset.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 64, "Prompt tokens per sequence.")
_NEW = flags.DEFINE_integer("new_tokens", 128, "Generated tokens per sequence.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per configuration.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Batch sizes.")


def _hf_times(hf_model, torch, ids, new_tokens, repeats):
    attn = torch.ones_like(ids)
    kw = dict(do_sample=False, cache_implementation="static", eos_token_id=None, pad_token_id=0)

    def run(n):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = hf_model.generate(ids, attention_mask=attn, max_new_tokens=n, min_new_tokens=n, **kw)
        return time.perf_counter() - t0, out

    run(new_tokens)  # warm-up (allocations, kernel selection)
    full = [run(new_tokens) for _ in range(repeats)]
    first = [run(1)[0] for _ in range(repeats)]
    t_full, t_first = statistics.median(t for t, _ in full), statistics.median(first)
    return t_full, t_first, full[0][1][:, ids.shape[1]:].numpy()


def main(argv):
    del argv
    import torch
    import transformers

    cores = len(os.sched_getaffinity(0))
    torch.set_num_threads(cores)
    cfg = config.get(_PRESET.value).replace(dtype="float32")
    params = jax.jit(model.init, static_argnums=0)(cfg, jax.random.key(0))
    with tempfile.TemporaryDirectory() as tmp:
        hf.save(tmp, cfg, params)
        hf_model = transformers.LlamaForCausalLM.from_pretrained(tmp, torch_dtype=torch.float32,
                                                                 attn_implementation="sdpa").eval()
    print(f"machine: {os.cpu_count()} CPUs ({cores} usable), jax {jax.__version__} ({jax.default_backend()}), "
          f"torch {torch.__version__}, transformers {transformers.__version__}; preset {cfg.name} "
          f"({cfg.param_count() / 1e6:.1f}M params), prompt {_PROMPT_LEN.value}, new tokens {_NEW.value}, "
          f"median of {_REPEATS.value}; load average {os.getloadavg()[0]:.2f}")
    print("| batch | llama_jax decode tok/s | HF decode tok/s | decode ratio | llama_jax end-to-end tok/s | "
          "HF end-to-end tok/s | end-to-end ratio | greedy tokens equal | llama_jax compile s |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    rng = np.random.default_rng(0)
    new = _NEW.value
    for batch in map(int, _BATCHES.value):
        prompts = rng.integers(1, cfg.vocab_size, (batch, _PROMPT_LEN.value))
        runs = [sampling.generate(cfg, params, prompts.tolist(), max_new_tokens=new)
                for _ in range(_REPEATS.value + 1)]
        compile_s, runs = runs[0].compile_s, runs[1:]  # the first call compiles; later calls reuse it
        ours_decode_s = statistics.median(r.decode_s for r in runs)
        ours_total_s = statistics.median(r.prefill_s + r.decode_s for r in runs)
        t_full, t_first, hf_tokens = _hf_times(hf_model, torch, torch.as_tensor(prompts), new, _REPEATS.value)
        # Decode loop: llama_jax's decode_s covers tokens 2..new (the prefill emits the first); so does HF's
        # t_full - t_first.
        ours_dec = batch * (new - 1) / ours_decode_s
        hf_dec = batch * (new - 1) / max(t_full - t_first, 1e-9)
        ours_e2e, hf_e2e = batch * new / ours_total_s, batch * new / t_full
        agree = float(np.mean(np.asarray(runs[0].tokens) == hf_tokens))
        print(f"| {batch} | {ours_dec:,.0f} | {hf_dec:,.0f} | {ours_dec / hf_dec:.2f}x | {ours_e2e:,.0f} | "
              f"{hf_e2e:,.0f} | {ours_e2e / hf_e2e:.2f}x | {agree:.0%} | {compile_s:.1f} |", flush=True)


if __name__ == "__main__":
    app.run(main)
