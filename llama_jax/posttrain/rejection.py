"""Rejection sampling (Llama 3 §4.2.2): K samples per prompt, scored, the best kept as SFT data.

`sample_responses` draws K responses per prompt with the batched KV-cache sampler (`llama_jax.infer.sampling`);
the sampling model may be any checkpoint with the same tokenizer (a larger teacher for a smaller student, as
Llama 3's 405B model for its 8B and 70B models). `score_with_verifier` / `score_with_reward_model` score them
(a program that checks the answer, or the reward model's scalar); `select` keeps the argmax per prompt when it
reaches `min_score`, and also forms a preference pair (best vs worst sample, when their scores differ) for DPO:
a choice of this project, not Llama 3's (its DPO trains on human preference annotations, §4.1.4).
Statistics: score distribution (mean, quantiles, histogram of best scores), kept fraction, pairs formed.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from absl import logging

from llama_jax.data.tokenizer import NUM_SPECIAL_TOKENS, Tokenizer
from llama_jax.infer import sampling
from llama_jax.model.config import ModelConfig
from llama_jax.posttrain import reward as reward_lib

Verifier = Callable[[Mapping[str, Any], str], float]


def load_verifier(spec: str) -> Verifier:
    """`"package.module:function"` -> the function `(record, response) -> score`."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"verifier {spec!r} must be 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"verifier {spec!r} cannot be loaded: {e}") from None
    if not callable(fn):
        raise ValueError(f"verifier {spec!r} is not callable")
    return fn


def _response_ids(ids: Sequence[int], tokenizer: Tokenizer) -> list[int]:
    """A sample's ids up to its stop token, cut at the first other special token (only a leading
    `<|python_tag|>` is part of a response) or id the tokenizer does not have (a model whose vocabulary is
    padded beyond the tokenizer's can sample those): the text ends there."""
    first_special = tokenizer.n_words - NUM_SPECIAL_TOKENS
    out = []
    for n, i in enumerate(ids):
        i = int(i)
        if i >= first_special and not (n == 0 and i == tokenizer.python_tag_id):
            break
        out.append(i)
    return out


def sample_responses(cfg: ModelConfig, params, tokenizer: Tokenizer, prompts: Sequence[Sequence[Mapping]], k: int,
                     max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                     batch_size: int = 64) -> list[list[str]]:
    """[prompt][sample] response texts: K samples per prompt (temperature 0 = greedy), in batches."""
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    encoded = [tokenizer.encode_dialog(list(p), add_generation_prompt=True)[0] for p in prompts]
    flat = [ids for ids in encoded for _ in range(k)]
    texts: list[str] = []
    cfg = cfg.replace(remat="none")
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        gen = sampling.generate(cfg, params, chunk, max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seed=seed * 1_000_003 + start, stop_ids=tokenizer.stop_ids)
        texts += [tokenizer.decode(_response_ids(t, tokenizer)) for t in gen.tokens]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def with_system_prompts(prompts: Sequence[Sequence[Mapping]], system_prompts: Sequence[str]) -> list[list[Mapping]]:
    """Prompt i with the (i mod n)-th system prompt as its first message (Llama 3 §4.2.2: in later rounds, system
    prompts steer the samples' tone, style or format); a prompt that has a system message already keeps it, and
    no system prompts leave every prompt as it is."""
    out = []
    for i, prompt in enumerate(prompts):
        prompt = list(prompt)
        if system_prompts and not (prompt and prompt[0].get("role") == "system"):
            prompt = [{"role": "system", "content": system_prompts[i % len(system_prompts)]}] + prompt
        out.append(prompt)
    return out


def score_with_verifier(records: Sequence[Mapping], responses: Sequence[Sequence[str]],
                        verifier: Verifier) -> np.ndarray:
    """[prompt, sample] float scores from `verifier(record, response)`; an empty response scores -inf."""
    return np.array([[float(verifier(r, s)) if s.strip() else -np.inf for s in samples]
                     for r, samples in zip(records, responses)], np.float64)


def score_with_reward_model(cfg: ModelConfig, params, tokenizer: Tokenizer, records: Sequence[Mapping],
                            responses: Sequence[Sequence[str]], batch_size: int = 64) -> np.ndarray:
    """[prompt, sample] rewards of the reward model (scalar head on the last token); empty responses -inf."""
    from llama_jax.posttrain import data as data_lib  # noqa: PLC0415
    head = reward_lib.reward_head_id(tokenizer)
    seqs, where = [], []
    for i, (r, samples) in enumerate(zip(records, responses)):
        for j, s in enumerate(samples):
            if s.strip():
                seqs.append(data_lib.encode_response(tokenizer, r["prompt"], s)[0])
                where.append((i, j))
    out = np.full((len(records), max((len(s) for s in responses), default=0)), -np.inf)
    if not seqs:
        return out
    fits = [len(s) <= cfg.max_seq_len for s in seqs]
    if not all(fits):  # a sequence the reward model cannot read scores -inf (never kept)
        logging.warning("%d sampled sequences are longer than the reward model's max_seq_len %d: scored -inf",
                        fits.count(False), cfg.max_seq_len)
        seqs, where = [s for s, f in zip(seqs, fits) if f], [w for w, f in zip(where, fits) if f]
        if not seqs:
            return out
    length = max(len(s) for s in seqs)
    fn = jax.jit(lambda p, t, pos, seg: reward_lib.rewards(cfg, p, t, pos, seg, head))
    values = []
    for start in range(0, len(seqs), batch_size):
        chunk = seqs[start:start + batch_size]
        tokens = np.zeros((batch_size, length), np.int32)
        seg = np.zeros_like(tokens)
        for row, s in enumerate(chunk):
            tokens[row, :len(s)], seg[row, :len(s)] = s, 1
        pos = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
        values += np.asarray(fn(params, tokens, pos, seg))[:len(chunk)].tolist()
    for (i, j), v in zip(where, values):
        out[i, j] = v
    return out


def _most_frequent(samples: Sequence[str], row: np.ndarray, score: float) -> int:
    """Index of the most frequent text (stripped) among the samples scoring `score` (the first on ties)."""
    candidates = [i for i, v in enumerate(row) if v == score]
    counts: dict[str, int] = {}
    for i in candidates:
        counts[samples[i].strip()] = counts.get(samples[i].strip(), 0) + 1
    return max(candidates, key=lambda i: (counts[samples[i].strip()], -i))


def select(records: Sequence[Mapping], responses: Sequence[Sequence[str]], scores: np.ndarray,
           min_score: float = -np.inf) -> tuple[list[dict], list[dict], dict]:
    """(SFT dialogs of the best sample per prompt, preference pairs best vs worst, statistics).

    The best is a sample of the highest score, the worst one of the lowest finite score; among samples of equal
    score the most frequent text is taken (the first on equal counts), so that with many samples the pair
    tends to hold the model's most likely correct and most likely wrong answers, the ones greedy decoding
    would produce. The best is kept when its score is finite and >= min_score. A pair is formed when the
    worst sample's score is strictly below the best's and the two texts differ.
    """
    scores = np.asarray(scores, np.float64)
    dialogs, pairs = [], []
    best_scores = []
    for r, samples, row in zip(records, responses, scores):
        best = _most_frequent(samples, row, float(np.max(row)))
        finite = row[np.isfinite(row)]
        worst = _most_frequent(samples, row, float(np.min(finite))) if finite.size else best
        best_scores.append(row[best])
        if not np.isfinite(row[best]) or row[best] < min_score:
            continue
        dialogs.append({"messages": list(r["prompt"]) + [{"role": "assistant", "content": samples[best]}]})
        if row[worst] < row[best] and samples[worst].strip() != samples[best].strip():
            pairs.append({"prompt": list(r["prompt"]), "chosen": samples[best], "rejected": samples[worst]})
    finite = scores[np.isfinite(scores)]
    best_arr = np.asarray(best_scores, np.float64)
    stats = {
        "prompts": len(records),
        "samples_per_prompt": int(scores.shape[1]) if scores.ndim == 2 else 0,
        "kept": len(dialogs),
        "kept_fraction": len(dialogs) / max(len(records), 1),
        "pairs": len(pairs),
        "empty_samples": int(np.sum(~np.isfinite(scores))),
        "score_mean": float(finite.mean()) if finite.size else None,
        "score_quantiles": ({q: float(np.quantile(finite, float(q))) for q in ("0.0", "0.25", "0.5", "0.75", "1.0")}
                            if finite.size else {}),
        "best_score_mean": float(best_arr[np.isfinite(best_arr)].mean()) if np.isfinite(best_arr).any() else None,
        "mean_score_per_prompt": float(np.mean([row[np.isfinite(row)].mean() for row in scores
                                                if np.isfinite(row).any()])) if finite.size else None,
    }
    return dialogs, pairs, stats


def task_scores(cfg: ModelConfig, params, tokenizer: Tokenizer, records: Sequence[Mapping], verifier: Verifier,
                max_new_tokens: int, batch_size: int = 64) -> np.ndarray:
    """[len(records)] verifier scores of the greedy answers to `records` (an empty answer scores 0)."""
    responses = sample_responses(cfg, params, tokenizer, [r["prompt"] for r in records], 1, max_new_tokens,
                                 temperature=0.0, batch_size=batch_size)
    scores = score_with_verifier(records, responses, verifier)[:, 0]
    return np.where(np.isfinite(scores), scores, 0.0)


__all__ = ["load_verifier", "sample_responses", "score_with_reward_model", "score_with_verifier", "select",
           "task_scores", "with_system_prompts"]
