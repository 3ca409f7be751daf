"""A multiple-choice set built from held-out text, and the scores the two-step downstream forecast needs.

The set (no download): the experiment's held-out documents (each source's `eval_split`; the first 20,000
characters of each) are cut into non-overlapping windows of `context_tokens + choice_tokens` tokens; `n_items`
windows drawn at random (seeded) give the items: the window's first `context_tokens` tokens are the passage,
and the four choices of `choice_tokens` tokens are its real continuation and the continuations of three other
windows of the same document (real text of the same length in tokens, in the same style and vocabulary, so
that what separates them is whether they follow the passage). The answer's position is seeded.

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
_MAX_CHARS = 20_000  # each document's prefix that is tokenized


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
    docs = []  # per document with >= CHOICES windows: its non-overlapping windows of `need` tokens
    for text in texts:
        ids = tokenizer.encode(text[:_MAX_CHARS], disallowed_special=())
        if len(ids) >= CHOICES * need:
            phase = int(rng.integers(0, len(ids) % need + 1))
            docs.append([tuple(ids[s:s + need]) for s in range(phase, len(ids) - need + 1, need)])
    pool = [(d, w) for d, windows in enumerate(docs) for w in range(len(windows))]
    if len(pool) < n_items:
        raise ValueError(f"held-out data has only {len(pool)} passages of {need} tokens in documents of >= "
                         f"{CHOICES * need} tokens; the multiple-choice set needs {n_items}")
    items = []
    for k in rng.permutation(len(pool))[:n_items]:
        d, w = pool[k]
        windows = docs[d]
        others = [j for j in rng.permutation(len(windows)) if j != w][:CHOICES - 1]
        answer = int(rng.integers(0, CHOICES))
        choices = [windows[j][context_tokens:] for j in others]
        choices.insert(answer, windows[w][context_tokens:])
        items.append(Item(windows[w][:context_tokens], tuple(choices), answer,
                          tuple(len(tokenizer.decode(list(c))) or 1 for c in choices)))
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
