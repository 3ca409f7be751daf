"""Text in, text out: checkpoint + tokenizer discovery around `llama_jax.infer.sampling.generate`.

    find_tokenizer(checkpoint, tokenizer=None) -> path of a Meta `tokenizer.model` or a HF `tokenizer.json`
    generate_text(checkpoint, prompt, chat=False, ...) -> (completion text, Generation)
"""

from __future__ import annotations

import os

import jax

from llama_jax.infer import sampling
from llama_jax.interop import checkpoints, hf_tokenizer

TOKENIZER_FILES = hf_tokenizer.TOKENIZER_FILES
SPECIAL_TOKEN_MODES = ("error", "text", "special")


def find_tokenizer(checkpoint: str, tokenizer: str | None = None) -> str:
    if tokenizer:
        if not os.path.isfile(tokenizer):
            raise FileNotFoundError(f"tokenizer file {tokenizer!r} does not exist")
        return tokenizer
    for name in TOKENIZER_FILES:
        candidate = os.path.join(checkpoint, name)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"no tokenizer given and none of {list(TOKENIZER_FILES)} found in {checkpoint!r}; "
                            "pass --tokenizer=PATH")


def default_compute_dtype() -> str:
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def generate_text(checkpoint: str, prompt: str, chat: bool = False, max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int = 0,
                  quantize: str | None = None, tokenizer: str | None = None,
                  dtype: str | None = None, special_tokens: str = "error") -> tuple[str, sampling.Generation]:
    """Loads `checkpoint` (HF or llama_jax folder), encodes `prompt` (as a one-turn user dialog with `chat`)
    and returns the decoded completion and the generation record (with timing).

    `special_tokens` says what special-token text (such as `<|eot_id|>`) in a plain prompt becomes: "error"
    (refused, naming it), "text" (ordinary text, as chat content always is) or "special" (the special token).
    """
    if special_tokens not in SPECIAL_TOKEN_MODES:
        raise ValueError(f"special_tokens={special_tokens!r}; expected one of {SPECIAL_TOKEN_MODES}")
    if not os.path.isdir(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist or is not a directory")
    tok = hf_tokenizer.read(find_tokenizer(checkpoint, tokenizer))
    cfg, params = checkpoints.load(checkpoint)
    cfg = cfg.replace(dtype=dtype or default_compute_dtype())
    if tok.n_words > cfg.vocab_size:
        raise ValueError(f"tokenizer has {tok.n_words} ids but the model's vocabulary is {cfg.vocab_size}")
    if chat:
        ids, _ = tok.encode_dialog([{"role": "user", "content": prompt}], add_generation_prompt=True)
    else:
        found = sorted(t for t in tok.model.special_tokens_set if t in prompt)
        if found and special_tokens == "error":
            raise ValueError(f"the prompt contains the special-token text {found[0]!r}; pass --special_tokens=special "
                             "to encode it as that token or --special_tokens=text to encode it as plain text")
        ids = tok.encode(prompt, bos=True, allowed_special="all" if special_tokens == "special" else (),
                         disallowed_special=())
    if len(ids) >= cfg.max_seq_len:
        raise ValueError(f"the prompt is {len(ids)} tokens long; the model's max_seq_len of {cfg.max_seq_len} "
                         f"leaves no room for new tokens (at most {cfg.max_seq_len - 1} prompt tokens)")
    max_new_tokens = min(max_new_tokens, cfg.max_seq_len - len(ids))
    gen = sampling.generate(cfg, params, [ids], max_new_tokens=max_new_tokens, temperature=temperature,
                            top_k=top_k, top_p=top_p, seed=seed, quantize=quantize,
                            stop_ids=hf_tokenizer.stop_ids(checkpoint, tok))
    return tok.decode(gen.tokens[0]), gen
