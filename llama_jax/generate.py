"""Generates text from a checkpoint.

    python -m llama_jax.generate --checkpoint=DIR --prompt="..." [--chat] [--max_new_tokens=256] \
        [--temperature=0] [--top_p=1] [--top_k=0] [--seed=0] [--quantize=fp8] [--tokenizer=PATH] \
        [--special_tokens=error|text|special]

DIR is a training workdir, a Hugging Face Llama folder or a llama_jax checkpoint folder; the tokenizer is `--tokenizer` or the
`tokenizer.model` (Meta format) inside DIR. Prints the completion and a tokens/s readout.
"""

from absl import flags

from llama_jax import cli
from llama_jax.infer import text

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir, HF Llama folder or llama_jax checkpoint folder.")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt text.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt as a user turn in the Llama 3 chat format.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Maximum number of generated tokens.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Sampling temperature; 0 = greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Keep only the k most likely tokens (0 = all).")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed for sampling.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["fp8"], "FP8 row-wise FFN quantization.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Path of a Meta-format tokenizer.model.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Compute dtype (default: bf16 on accelerators).")
_SPECIAL = flags.DEFINE_enum("special_tokens", "error", list(text.SPECIAL_TOKEN_MODES),
                             "What special-token text (e.g. <|eot_id|>) in a plain prompt becomes: an error, plain "
                             "text, or the special token.")
flags.mark_flags_as_required(["checkpoint", "prompt"])
cli.nonempty(_CHECKPOINT, _TOKENIZER)
cli.validate(_TEMPERATURE, lambda t: t >= 0, ">= 0 (0 = greedy)")
cli.validate(_TOP_P, lambda p: 0 < p <= 1, "in (0, 1]")
cli.validate(_TOP_K, lambda k: k >= 0, ">= 0 (0 = all tokens)")


def main():
    completion, gen = text.generate_text(
        _CHECKPOINT.value, _PROMPT.value, chat=_CHAT.value, max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value, seed=_SEED.value,
        quantize=_QUANTIZE.value, tokenizer=_TOKENIZER.value, dtype=_DTYPE.value, special_tokens=_SPECIAL.value)
    print(completion)
    print(f"[{gen.prompt_tokens} prompt tokens: {gen.prefill_tokens_per_s:.1f} tok/s prefill | "
          f"{gen.generated_tokens} new tokens: {gen.decode_tokens_per_s:.1f} tok/s decode | "
          f"compile {gen.compile_s:.1f}s | finish: {gen.finish_reasons[0]}]")


if __name__ == "__main__":
    cli.run(main)
