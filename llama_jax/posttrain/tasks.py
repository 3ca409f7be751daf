"""A program-verifiable task the project generates: small-integer addition in the Llama 3 dialog format.

`write_arithmetic(directory, ...)` writes (atomically, deterministically from its seed; an experiment config names
the files with `arithmetic_paths` and lets the run write them, `prepare_arithmetic`, so loading a config writes
nothing):

    sft.jsonl        dialogs "What is a + b?" -> "a + b = c" (the SFT seed data)
    prompts.jsonl    prompts with their answers, disjoint from sft.jsonl (rejection sampling's input)
    heldout.jsonl    prompts with answers, disjoint from both (held-out accuracy)
    pretrain.jsonl   {"text": "What is a + b? a + b = c"} for every pair (plain text; the dialogs and
                     held-out prompts use the chat format)
    tokenizer.model  a 290-rank BPE tokenizer (Meta format) trained on all problems with operands below
                     max(20, max_operand)

`verify_arithmetic(record, response)` is the verifier: 1.0 when the last integer in the response equals the
record's `answer`, else 0.0 (held-out accuracy). `score_arithmetic` grades the work shown as well (1.0 / 0.5 /
0.0), for choosing the best and worst samples in rejection sampling and for labelling preferences (the
synthetic annotator, with `edit_arithmetic` as its editing step).
"""

from __future__ import annotations

import json
import os
import random
import re

from llama_jax.posttrain import data as data_lib

_INT = re.compile(r"-?\d+")


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}?"


def answer_text(a: int, b: int) -> str:
    return f"{a} + {b} = {a + b}"


def verify_arithmetic(record, response: str) -> float:
    found = _INT.findall(response)
    return 1.0 if found and int(found[-1]) == int(record["answer"]) else 0.0


_QUESTION = re.compile(r"What is (\d+) \+ (\d+)\?")
_EQUATION = re.compile(r"(-?\d+)\s*\+\s*(-?\d+)\s*=\s*(-?\d+)")


def score_arithmetic(record, response: str) -> float:
    """A graded verifier for choosing samples: 1.0 when the answer is right (`verify_arithmetic`) and the work
    shown is too (every "x + y = z" in the response is true and restates the question's operands), 0.5 when
    only the answer is right (e.g. "7 + 18 = 26" for 7 + 19), 0.0 otherwise. Rejection sampling with it keeps
    only fully correct samples as the best (SFT data, DPO's chosen) and pairs them with wrong answers."""
    if not verify_arithmetic(record, response):
        return 0.0
    asked = _QUESTION.search(record["prompt"][-1]["content"])
    operands = sorted(int(x) for x in asked.groups()) if asked else None
    for x, y, z in _EQUATION.findall(response):
        if int(x) + int(y) != int(z) or (operands is not None and sorted((int(x), int(y))) != operands):
            return 0.5
    return 1.0


def edit_arithmetic(record, response: str) -> str:
    """The synthetic annotator's editing step (`posttrain.annotation`): the worked answer "a + b = c" when the
    response is not fully correct (`score_arithmetic` below 1), else "" (nothing to improve)."""
    asked = _QUESTION.search(record["prompt"][-1]["content"])
    if asked is None or score_arithmetic(record, response) == 1.0:
        return ""
    return answer_text(int(asked.group(1)), int(asked.group(2)))


def arithmetic_paths(task_dir: str, max_operand: int = 40, n_sft: int = 120, n_prompts: int = 400,
                     n_heldout: int = 1000, seed: int = 0) -> dict[str, str]:
    """Where `write_arithmetic` puts the task of these settings, without touching a file: a folder of its own
    under `task_dir` named by the settings, so tasks of different sizes never share (or rewrite) files.
    `paths["directory"]` is that folder. Settings that cannot be met are an error here already."""
    pairs = max_operand * max_operand
    if n_sft + n_prompts + n_heldout > pairs:
        raise ValueError(f"{n_sft} + {n_prompts} + {n_heldout} problems requested but only {pairs} distinct "
                         f"pairs exist with operands below {max_operand}")
    directory = os.path.join(task_dir, f"arithmetic-o{max_operand}-s{n_sft}-p{n_prompts}-h{n_heldout}-seed{seed}")
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("sft", "prompts", "heldout", "pretrain")}
    return dict(paths, tokenizer=os.path.join(directory, "tokenizer.model"), directory=directory)


def write_arithmetic(directory: str, max_operand: int = 40, n_sft: int = 120, n_prompts: int = 400,
                     n_heldout: int = 1000, seed: int = 0) -> dict[str, str]:
    """Writes the task's files under `directory` (skipped when already written with these settings); every
    file is written atomically under a name of its own, so concurrent writers of the same task do not collide."""
    pairs = [(a, b) for a in range(max_operand) for b in range(max_operand)]
    if n_sft + n_prompts + n_heldout > len(pairs):
        raise ValueError(f"{n_sft} + {n_prompts} + {n_heldout} problems requested but only {len(pairs)} distinct "
                         f"pairs exist with operands below {max_operand}")
    settings = dict(max_operand=max_operand, n_sft=n_sft, n_prompts=n_prompts, n_heldout=n_heldout, seed=seed,
                    format=3)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in ("sft", "prompts", "heldout", "pretrain")}
    paths["tokenizer"] = os.path.join(directory, "tokenizer.model")
    marker = os.path.join(directory, "settings.json")
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == settings and all(os.path.isfile(p) for p in paths.values()):
                return paths
    random.Random(seed).shuffle(pairs)
    sft = pairs[:n_sft]
    prompts = pairs[n_sft:n_sft + n_prompts]
    heldout = pairs[n_sft + n_prompts:n_sft + n_prompts + n_heldout]
    data_lib.write_jsonl(paths["sft"], [{"messages": [{"role": "user", "content": question(a, b)},
                                                      {"role": "assistant", "content": answer_text(a, b)}]}
                                        for a, b in sft])
    for name, items in (("prompts", prompts), ("heldout", heldout)):
        data_lib.write_jsonl(paths[name], [{"prompt": [{"role": "user", "content": question(a, b)}], "answer": a + b}
                                           for a, b in items])
    # Pretraining text states every fact, held-out ones included (as a web corpus would): post-training must
    # elicit them in the dialog format for prompts it never trained on.
    texts = [f"{question(a, b)} {answer_text(a, b)}" for a, b in pairs]
    data_lib.write_jsonl(paths["pretrain"], [{"text": t} for t in texts])
    from llama_jax.data.tokenizer import train_bpe  # noqa: PLC0415
    # The tokenizer sees every problem with operands below max(20, max_operand) whatever the task's other sizes.
    top = max(20, max_operand)
    vocab_texts = [f"{question(a, b)} {answer_text(a, b)}" for a in range(top) for b in range(top)]
    train_bpe(vocab_texts + ["user assistant system ipython"], 290, paths["tokenizer"])
    data_lib.write_jsonl(marker, [settings])  # last: the task is complete once its settings are there
    return paths


def prepare_arithmetic(paths: dict[str, str], **settings) -> dict:
    """The `config.prepare` entry that writes the task of `arithmetic_paths(..., **settings)` when a run starts."""
    return dict(call="llama_jax.posttrain.tasks:write_arithmetic", kwargs=dict(directory=paths["directory"], **settings))


__all__ = ["answer_text", "arithmetic_paths", "edit_arithmetic", "prepare_arithmetic", "question", "score_arithmetic",
           "verify_arithmetic", "write_arithmetic"]
