"""Held-out accuracy with 95% intervals, and paired tests between each post-training stage and its start.

Every stage with a task evaluation writes one verifier score per held-out prompt (`stages/<name>/
task_scores.json`: the model the stage ends with; `start_task_scores.json`: the model an SFT stage started
from, e.g. the pretrained one). The same prompts, in the same order, are scored for every model, so two models
are compared prompt by prompt:

* the interval of an accuracy is Wilson's score interval (Wilson 1927), which keeps its coverage near 0 and 1
  where the normal approximation does not;
* the paired test is McNemar's exact test (McNemar 1947): of the prompts where the two models disagree, b were
  won by the later model and c by the earlier; under "no difference" b ~ Binomial(b + c, 1/2), and the
  two-sided p-value is min(1, 2 P(X <= min(b, c))). Prompts both models get right (or wrong) carry no evidence.
  For graded (non-0/1) scores a prompt counts as won when its score is higher.

    python -m llama_jax.posttrain.significance --workdir=/tmp/llama_herd   # table; <workdir>/significance.json
"""

from __future__ import annotations

import json
import math
import os
from typing import Sequence

import numpy as np

from llama_jax import workdir as workdir_lib

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
TASK_SCORES = "task_scores.json"  # per stage: the model it ends with (written by stages.common.task_eval)
START_SCORES = "start_task_scores.json"  # per SFT stage: the model it started from


def wilson_interval(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for a binomial proportion successes / n (95% by default)."""
    if n <= 0:
        raise ValueError("an interval needs at least one trial")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar_exact(before: Sequence[float], after: Sequence[float]) -> dict:
    """McNemar's exact two-sided test of paired scores: {"won": b (after higher), "lost": c (before higher),
    "p": p-value}."""
    before, after = np.asarray(before, np.float64), np.asarray(after, np.float64)
    if before.shape != after.shape:
        raise ValueError(f"paired scores differ in length: {before.shape[0]} vs {after.shape[0]} prompts")
    won, lost = int(np.sum(after > before)), int(np.sum(after < before))
    n, k = won + lost, min(won, lost)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n if n else 1.0
    return {"won": won, "lost": lost, "p": min(1.0, 2.0 * tail)}


def _read(path: str) -> dict | None:
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def stage_scores(workdir: str) -> list[tuple[str, dict]]:
    """[(model name, score record)] of a run in stage order: an SFT stage's start model (named `<stage>:start`)
    before the stage, every stage with a task evaluation."""
    with open(workdir_lib.config_path(workdir)) as f:
        names = [s["name"] for s in json.load(f)["stages"]]
    out = []
    for name in names:
        start = _read(workdir_lib.stage_output_path(workdir, name, START_SCORES))
        if start is not None:
            out.append((f"{name}:start", start))
        own = _read(workdir_lib.stage_output_path(workdir, name, TASK_SCORES))
        if own is not None:
            out.append((name, own))
    return out


def report(workdir: str) -> list[dict]:
    """One row per evaluated model: accuracy, its 95% interval, and the paired test against each model it is
    compared with (the stage it started from, an average's sources; an SFT stage against its start model; a
    model whose scores equal an earlier baseline's, e.g. a sampling stage's copy of the policy, once)."""
    models = stage_scores(workdir)
    by_name = dict(models)
    rows = []
    for name, rec in models:
        scores = np.asarray(rec["scores"], np.float64)
        lo, hi = wilson_interval(float(np.sum(scores)), scores.size)
        row = {"model": name, "prompts": int(scores.size), "accuracy": float(np.mean(scores)), "ci95": [lo, hi],
               "paired": []}
        baselines = ([f"{name}:start"] if f"{name}:start" in by_name else []) + list(rec.get("compared_with", []))
        seen = []
        for base in baselines:
            if base not in by_name or by_name[base]["scores"] in seen:  # absent, or the same model's scores again
                continue
            seen.append(by_name[base]["scores"])
            other = np.asarray(by_name[base]["scores"], np.float64)
            test = mcnemar_exact(other, scores)
            row["paired"].append(dict(test, against=base, delta=float(np.mean(scores) - np.mean(other))))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| model | prompts | accuracy [95% CI] | paired vs | change | won / lost | p (McNemar exact) |",
             "|---|--:|---|---|--:|--:|--:|"]
    for r in rows:
        acc = f"{r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        tests = r["paired"] or [None]
        for t in tests:
            if t is None:
                lines.append(f"| {r['model']} | {r['prompts']} | {acc} | - | - | - | - |")
            else:
                lines.append(f"| {r['model']} | {r['prompts']} | {acc} | {t['against']} | {t['delta']:+.3f} | "
                             f"{t['won']} / {t['lost']} | {t['p']:.2g} |")
    return "\n".join(lines)


def main(argv):
    del argv
    from absl import flags  # noqa: PLC0415
    workdir = flags.FLAGS.workdir
    if not os.path.isfile(workdir_lib.config_path(workdir)):
        raise SystemExit(f"--workdir={workdir!r} is not a run's workdir (no {workdir_lib.config_path(workdir)})")
    rows = report(workdir)
    if not rows:
        raise SystemExit(f"no stage of {workdir} has held-out task scores ({TASK_SCORES})")
    workdir_lib.write_json_atomic(os.path.join(workdir, "significance.json"), rows)
    print(format_table(rows))


if __name__ == "__main__":
    from absl import app, flags

    flags.DEFINE_string("workdir", None, "the run's workdir", required=True)
    app.run(main)
