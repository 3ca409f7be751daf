"""Needle-in-a-haystack / passkey retrieval across context lengths and needle depths.

A trial is one sequence of exactly `length` tokens (Mohtashami & Jaggi's passkey task, as used for Llama 3.1's
long-context gates):

    <bos> filler ... "The pass key is 48213. Remember it. 48213 is the pass key." filler ...
    "What is the pass key? The pass key is 48213"

with the needle starting at fraction `depth` of the filler. The model is scored by teacher forcing in one
forward pass: the trial counts as retrieved when the greedy (argmax) prediction of every answer token is
correct, which is exactly when greedy decoding would reproduce the key. `evaluate` returns the accuracy table
[length x depth] (and, as a diagnostic only, the fraction of answer tokens right per cell: `token_accuracy`);
`write_heatmap` draws it (matplotlib, Agg backend) and `format_table` prints it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np

from llama_jax.data import passkey
from llama_jax.model import transformer
from llama_jax.model.config import ModelConfig

FILLER = passkey.EVAL_FILLER


@dataclasses.dataclass(frozen=True)
class NeedleResult:
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    accuracy: np.ndarray  # [len(lengths), len(depths)], fraction of trials retrieved
    trials: int
    # [len(lengths), len(depths)], fraction of answer tokens predicted right (a diagnostic: a model that copies
    # some digits of the key scores 0 in `accuracy` but shows here; the leading space token alone is ~1/5)
    token_accuracy: np.ndarray | None = None

    def mean(self, length: int | None = None) -> float:
        rows = self.accuracy if length is None else self.accuracy[self.lengths.index(length)]
        return float(np.mean(rows))

    def to_json(self) -> dict:
        out = {"lengths": list(self.lengths), "depths": list(self.depths), "trials": self.trials,
               "accuracy": [[float(a) for a in row] for row in self.accuracy]}
        if self.token_accuracy is not None:
            out["token_accuracy"] = [[round(float(a), 4) for a in row] for row in self.token_accuracy]
        return out


def make_trial(encode: Callable[[str], list[int]], bos: int, length: int, depth: float, key: int) -> tuple[
        np.ndarray, np.ndarray]:
    """(tokens [length], answer mask [length]: 1 on the positions whose next token is a key token)."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"needle depth must be in [0, 1], got {depth}")
    needle = encode(passkey.needle_text(key))
    question = encode(passkey.QUESTION)
    answer = encode(f" {key}")
    filler = encode(FILLER)
    room = length - 1 - len(needle) - len(question) - len(answer)
    if room < 0:
        raise ValueError(f"needle length {length} is too short for the passkey prompt "
                         f"({length - room} tokens needed)")
    hay = (filler * (room // len(filler) + 1))[:room]
    cut = int(round(depth * room))
    ids = [bos] + hay[:cut] + needle + hay[cut:] + question + answer
    mask = np.zeros(length, np.int32)
    mask[length - len(answer) - 1:length - 1] = 1  # predictions of the answer tokens
    return np.asarray(ids, np.int32), mask


def evaluate(cfg: ModelConfig, params: Any, encode: Callable[[str], list[int]], bos: int,
             lengths: Sequence[int], depths: Sequence[float], trials: int = 4, seed: int = 0,
             batch: int = 4, predict: Callable[[np.ndarray], np.ndarray] | None = None) -> NeedleResult:
    """Accuracy of passkey retrieval for every (length, depth); keys are random 5-digit numbers from `seed`,
    drawn from the evaluation's half of the keys (`llama_jax.data.passkey.is_eval_key`): the synthetic
    `passkey` training source uses the other half and other filler, so accuracy measures retrieval.

    `predict(tokens [b, n]) -> argmax ids [b, n]` replaces the model's forward pass (for other models)."""
    if trials < 1:
        raise ValueError(f"needle trials must be >= 1, got {trials}")
    too_long = [n for n in lengths if n > cfg.max_seq_len]
    if too_long:
        raise ValueError(f"needle length(s) {too_long} exceed the model's max_seq_len {cfg.max_seq_len}")
    rng = np.random.default_rng(seed)
    if predict is None:
        fwd = jax.jit(lambda p, t: transformer.forward(cfg, p, t).argmax(-1))
        predict = lambda t: np.asarray(fwd(params, t))  # noqa: E731
    acc = np.zeros((len(lengths), len(depths)))
    tok_acc = np.zeros((len(lengths), len(depths)))
    for i, length in enumerate(lengths):
        for j, depth in enumerate(depths):
            rows = [make_trial(encode, bos, int(length), float(depth), passkey.draw_key(rng, for_eval=True))
                    for _ in range(trials)]
            hits, right, answer_tokens = 0, 0, 0
            for s in range(0, trials, batch):
                chunk = rows[s:s + batch]
                toks = np.stack([r[0] for r in chunk])
                masks = np.stack([r[1] for r in chunk])
                pred = np.asarray(predict(toks))
                targets = np.roll(toks, -1, axis=1)
                ok = np.all((pred == targets) | (masks == 0), axis=1)
                hits += int(ok.sum())
                right += int(((pred == targets) & (masks == 1)).sum())
                answer_tokens += int(masks.sum())
            acc[i, j] = hits / trials
            tok_acc[i, j] = right / max(answer_tokens, 1)
    return NeedleResult(tuple(int(n) for n in lengths), tuple(float(d) for d in depths), acc, trials, tok_acc)


def format_table(r: NeedleResult) -> str:
    head = "| length | " + " | ".join(f"depth {d:.2f}" for d in r.depths) + " | mean |"
    sep = "|---:|" + "---:|" * (len(r.depths) + 1)
    rows = [f"| {n} | " + " | ".join(f"{a:.2f}" for a in r.accuracy[i]) + f" | {r.accuracy[i].mean():.2f} |"
            for i, n in enumerate(r.lengths)]
    return "\n".join([head, sep] + rows)


def write_heatmap(r: NeedleResult, path: str, title: str = "passkey retrieval accuracy") -> str:
    """A length x depth heat map PNG of the accuracy table; returns `path`."""
    import matplotlib  # noqa: PLC0415 - plotting is optional at import time
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(r.depths), 1.0 + 0.5 * len(r.lengths)))
    im = ax.imshow(r.accuracy, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(r.depths)), [f"{d:.2f}" for d in r.depths])
    ax.set_yticks(range(len(r.lengths)), [str(n) for n in r.lengths])
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    for i in range(len(r.lengths)):
        for j in range(len(r.depths)):
            ax.text(j, i, f"{r.accuracy[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
