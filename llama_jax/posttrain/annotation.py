"""Preference annotation (Llama 3 §4.2.1) by a synthetic annotator: two responses per prompt, from two different
models, labelled chosen / rejected with a strength, and optionally edited.

The paper samples two responses from two different models for each prompt after each round (the best models of
the round), has annotators state which one they prefer and how strongly, on four levels (`data.STRENGTHS`), and
adds an editing step in which the chosen response is improved (ranking edited > chosen > rejected); the reward
model and DPO then keep only "significantly better" and "better" (`data.KEPT_STRENGTHS`). Here the annotator is a
program: a graded verifier `(record, response) -> score` prefers the higher score, and the strength grows with
the score gap (`strength`); an optional editor `(record, chosen) -> improved response or ""` plays the editing
step. Equal scores state no preference: no record (counted as `ties`).

`strength`'s thresholds are this project's choice (the paper's annotators are people): a gap of at least the
verifier's whole score range (`scale`) is "significantly better", half of it "better", a quarter "slightly
better", anything above 0 "marginally better". With `tasks.score_arithmetic` (grades 1, 0.5, 0) a right answer
with right work over a wrong answer is "significantly better", every other preference "better".
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from llama_jax.posttrain.data import STRENGTHS

Editor = Callable[[Mapping, str], str]


def strength(gap: float, scale: float = 1.0) -> str | None:
    """The strength label of a preference whose scores differ by `gap` (>= 0) on a score range `scale`; None
    when the scores are equal (no preference)."""
    if not gap > 0:
        return None
    for level, share in zip(STRENGTHS, (1.0, 0.5, 0.25)):
        if gap >= share * scale:
            return level
    return STRENGTHS[-1]


def annotate(records: Sequence[Mapping], responses: Sequence[tuple[str, str]], scores: np.ndarray,
             models: Sequence[tuple[str, str]], scale: float = 1.0, editor: Editor | None = None
             ) -> tuple[list[dict], dict]:
    """(preference records, statistics) of two scored responses per prompt.

    `responses[i]` and `scores[i]` ([prompt, 2]; -inf for an empty response) are prompt i's two responses and
    their annotator scores, `models[i]` the names of the models that wrote them. A record holds the prompt,
    chosen (the higher score), rejected, the strength label, the two models (`"models": [chosen's, rejected's]`)
    and `edited` when the editor returns a response distinct from both. No record when the scores are equal, the
    two texts are the same (`ties`) or a response is empty (`empty`).
    """
    scores = np.asarray(scores, np.float64)
    out, ties, empty, edited = [], 0, 0, 0
    per_model: dict[str, list[float]] = {}
    for record, pair, row, names in zip(records, responses, scores, models):
        for name, value in zip(names, row):
            per_model.setdefault(name, []).append(float(value) if np.isfinite(value) else 0.0)
        if not np.isfinite(row).all():  # an empty response is not shown to the annotator
            empty += 1
            continue
        best = int(np.argmax(row))
        label = strength(float(row[best] - row[1 - best]), scale)
        chosen, rejected = pair[best], pair[1 - best]
        if label is None or chosen.strip() == rejected.strip():
            ties += 1
            continue
        annotation = {"prompt": list(record["prompt"]), "chosen": chosen, "rejected": rejected, "strength": label,
                      "models": [names[best], names[1 - best]]}
        better = editor(record, chosen) if editor is not None else ""
        if better and better.strip() not in (chosen.strip(), rejected.strip()):
            annotation["edited"] = better
            edited += 1
        out.append(annotation)
    stats = {"prompts": len(records), "pairs": len(out), "ties": ties, "empty": empty, "edited": edited,
             "strengths": {level: sum(a["strength"] == level for a in out) for level in STRENGTHS},
             "model_score_mean": {name: float(np.mean(v)) for name, v in per_model.items()}}
    return out, stats


__all__ = ["Editor", "annotate", "strength"]
