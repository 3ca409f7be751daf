"""A multiple-choice set built from held-out text, and the scores the two-step downstream forecast needs.

The set (no download): from the experiment's held-out documents (each source's `eval_split`), in a seeded order,
each document long enough gives one item: a passage of `context_tokens` tokens at a seeded offset, and four
choices of `choice_tokens` tokens each: the passage's real continuation and the continuations of three other
items' passages (so every choice is real text of the same length in tokens). The answer's position is seeded.

Scores of a model (Llama 3 §3.2.1, "normalized NLL per character"): for each choice, the negative
log-likelihood of its tokens given `[BOS] + passage`, in nats, divided by the choice's length in characters.
`mc_nll` is the mean of that for the correct choice; `mc_acc` the fraction of items whose correct choice has the
lowest normalized NLL (chance 1/4).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

CHOICES = 4
_MAX_CHARS = 8000  # each document's prefix that is tokenized (items need only a few hundred tokens)


@dataclasses.dataclass(frozen=True)
class Item:
    context: tuple[int, ...]
    choices: tuple[tuple[int, ...], ...]
    answer: int
    chars: tuple[int, ...]  # characters of each choice's text


def build_items(texts: Sequence[str], tokenizer, n_items: int, context_tokens: int, choice_tokens: int,
                seed: int = 0) -> list[Item]:
    """The multiple-choice set of `n_items` items (see the module docstring)."""
    if n_items < CHOICES:
        raise ValueError(f"a multiple-choice set needs at least {CHOICES} items, got n_items={n_items}")
    rng = np.random.default_rng(seed)
    need = context_tokens + choice_tokens
    spans = []
    for i in rng.permutation(len(texts)):
        ids = tokenizer.encode(texts[i][:_MAX_CHARS], disallowed_special=())
        if len(ids) < need:
            continue
        start = int(rng.integers(0, len(ids) - need + 1))
        spans.append((tuple(ids[start:start + context_tokens]), tuple(ids[start + context_tokens:start + need])))
        if len(spans) == n_items:
            break
    if len(spans) < n_items:
        raise ValueError(f"held-out data has only {len(spans)} documents of >= {need} tokens; the multiple-choice "
                         f"set needs {n_items}")
    items = []
    for i, (context, real) in enumerate(spans):
        others = [j for j in rng.permutation(n_items) if j != i][:CHOICES - 1]
        answer = int(rng.integers(0, CHOICES))
        choices = [spans[j][1] for j in others]
        choices.insert(answer, real)
        items.append(Item(context, tuple(choices), answer, tuple(len(tokenizer.decode(list(c))) or 1
                                                                  for c in choices)))
    return items


def score(cfg, params, items: Sequence[Item], bos_id: int, batch: int = 64) -> dict[str, float]:
    """{"mc_nll": mean normalized NLL of the correct choice (nats/char), "mc_acc": accuracy} of a model."""
    if not items:
        raise ValueError("empty multiple-choice set")
    rows = [[bos_id] + list(it.context) + list(c) for it in items for c in it.choices]
    return _score_rows(cfg, params, items, rows, len(items[0].context) + 1, batch)


def _score_rows(cfg, params, items, rows, prefix: int, batch: int) -> dict[str, Any]:
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415

    from llama_jax.model import transformer  # noqa: PLC0415

    tokens = np.asarray(rows, dtype=np.int32)
    if tokens.max() >= cfg.vocab_size:
        raise ValueError(f"token id {int(tokens.max())} out of range for vocab_size {cfg.vocab_size}")

    @jax.jit
    def nll(params, toks):
        logits = transformer.forward(cfg, params, toks[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        tok_lp = jnp.take_along_axis(logp, toks[:, 1:, None], axis=-1)[..., 0]
        return -tok_lp[:, prefix - 1:].sum(axis=-1)

    pad = (-len(tokens)) % batch
    padded = np.concatenate([tokens, np.repeat(tokens[:1], pad, axis=0)]) if pad else tokens
    out = np.concatenate([np.asarray(nll(params, padded[i:i + batch])) for i in range(0, len(padded), batch)])
    per_char = out[:len(tokens)].reshape(len(items), CHOICES) / np.asarray([it.chars for it in items], np.float64)
    answers = np.asarray([it.answer for it in items])
    correct = per_char[np.arange(len(items)), answers]
    return {"mc_nll": float(correct.mean()), "mc_acc": float((per_char.argmin(axis=1) == answers).mean())}
