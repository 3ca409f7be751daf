"""What post-training can still elicit on the herd's arithmetic task: the pretrained model's own knowledge of the
held-out facts, asked in its pretraining format, against what each post-trained stage answers in dialog.

    python benchmarks/herd_headroom.py --workdir=/tmp/llama_herd [--stages=sft,sft_r1,dpo_r1]

The pretraining text states every fact ("What is a + b? a + b = c"); a held-out prompt's fact is "known" when the
pretrained model, greedy, completes "What is a + b? a + b =" with c. Post-training changes the format and
which answer is preferred; it adds no facts. For each stage (its `task_scores.json`, the same 1,000 held-out
prompts in the same order) the table counts the prompts it gets right among the known and the unknown facts:
a stage that answers every known fact and no unknown one has elicited all that pretraining put there, and
preference optimization on other prompts has nothing left to elicit.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from llama_jax import workdir as workdir_lib  # noqa: E402
from llama_jax.data.tokenizer import Tokenizer  # noqa: E402
from llama_jax.infer import sampling  # noqa: E402
from llama_jax.posttrain import tasks  # noqa: E402
from llama_jax.train import resume  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "a finished experiments/herd.py:cpu run", required=True)
_STAGES = flags.DEFINE_list("stages", ["sft", "sft_r1", "dpo_r1", "dpo_r1_2", "avg_r1"], "stages to compare")
_PRETRAINED = flags.DEFINE_string("pretrained", "pretrain", "the pretraining stage")


def known_facts(workdir: str, stage: str, records: list[dict]) -> np.ndarray:
    """[prompts] 1.0 where the pretrained model completes the fact in its pretraining format, greedy."""
    cfg, params = resume.load_workdir(workdir, stage=stage)
    tok = Tokenizer.from_file(os.path.join(workdir, "tokenizer.model"))
    prompts = []
    for r in records:
        question = r["prompt"][-1]["content"]
        a, b = (int(x) for x in tasks._QUESTION.search(question).groups())
        prompts.append(tok.encode(f"{question} {a} + {b} =", bos=True))
    out = []
    for start in range(0, len(prompts), 128):
        gen = sampling.generate(cfg, params, prompts[start:start + 128], max_new_tokens=3, temperature=0.0)
        out += [tasks.verify_arithmetic(r, tok.decode(list(t)).split("What")[0])
                for r, t in zip(records[start:start + 128], gen.tokens)]
    return np.asarray(out, np.float64)


def main(argv):
    del argv
    workdir = _WORKDIR.value
    with open(workdir_lib.stage_output_path(workdir, _STAGES.value[0], "task_scores.json")) as f:
        prompts_file = json.load(f)["prompts"]
    with open(prompts_file) as f:
        records = [json.loads(line) for line in f]
    known = known_facts(workdir, _PRETRAINED.value, records) > 0
    print(f"held-out prompts: {len(records)}; facts the pretrained model completes in text: {known.sum()} "
          f"({known.mean():.3f})")
    print("| stage | dialog accuracy | right among known facts | right among unknown facts |")
    print("|---|--:|--:|--:|")
    for stage in _STAGES.value:
        path = workdir_lib.stage_output_path(workdir, stage, "task_scores.json")
        if not os.path.isfile(path):
            continue
        with open(path) as f:
            right = np.asarray(json.load(f)["scores"]) > 0
        print(f"| {stage} | {right.mean():.3f} | {right[known].sum()} / {known.sum()} | "
              f"{right[~known].sum()} / {(~known).sum()} |")


if __name__ == "__main__":
    app.run(main)
