"""Stage kinds: what differs between pretraining, long-context extension, annealing and post-training.

The driver (`llama_jax.train.loop`) is shared by every kind and does not change when a kind is added: it
restores or initializes the stage, steps, observes the metrics (spike / rollback monitor), checkpoints,
evaluates periodically, honours SIGTERM and finishes the stage. A kind supplies four things, through a small
protocol:

    class MyKind(StageKind):
        name = "my_kind"
        def train_iterator(self, ctx, phase, start_documents) -> checkpointable iterator of batches of
                                                                   the logical data shard ctx.data_shard
        def loss_fn(self, ctx) -> (params, batch) -> (loss_sum, token_count), or None for next-token CE
        def evaluate(self, ctx, params, phase, step) -> {metric: float}
        def finish(self, ctx, state) -> {key: JSON value} merged into the stage's DONE.json
        def initial_params(self, ctx, abstract_params) -> (params, description) or None   (optional)

    register(MyKind())

`initial_params` lets a kind set the parameters a stage starts from when it has no checkpoint of its own, in
place of its init source (the previous stage, `init_from` or scratch): `average` returns the weighted mean of
checkpoints of earlier stages or other runs. The driver calls it once, before the stage's first checkpoint
(step 0) is written; a restarted stage resumes from its own checkpoints and never calls it again.

`ctx` is a `StageContext`: the typed `experiment.Stage`, the experiment config, the tokenizer, the mesh and
rules, the metric writer and the stage's workdir paths. Batches follow the one batch contract
(`llama_jax.data.batch`): a kind whose examples are not packed documents (preference pairs, dialogs with
masks) still yields `inputs/targets/segment_ids/positions/loss_mask` rows (plus keys its own loss reads), and
its iterator must be a grain `DatasetIterator` (get_state / set_state) so that resume is exact. The optional
host-only `documents` key lets the driver continue one document stream across a batch-shape ramp; iterators
without it simply restart their stream at a phase change.

Registered: `pretrain` (next-token loss on packed documents, evaluation on the sources' validation split,
text samples at the end); `sft`, `reward`, `rejection_sampling`, `dpo`, `average` (`llama_jax.posttrain.stages`, settings
in the stage's `options`, validated by the kind's `options` hook); `long_context` and `anneal`
(llama_jax.train.long_context: gates at the end of an extension stage; checkpoint averaging at the end of
annealing).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_collections

from llama_jax import experiment
from llama_jax.data import pipeline
from llama_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass
class StageContext:
    """What a kind may read: the typed stage and the run's shared objects (no mutable training state)."""

    stage: experiment.Stage
    config: ml_collections.ConfigDict
    tokenizer: Tokenizer
    mesh: Any
    rules: Any
    writer: Any
    data_cfg: dict
    to_device: Callable[[Mapping[str, Any]], dict]
    eval_step: Callable[[int, int], Callable]  # (seq_len, global_batch) -> compiled (params, batch) -> (sum, n)
    workdir: str = ""  # the run's workdir (kinds that read an earlier stage's results)
    # (shard, shard count) of the logical data shard a train iterator reads (`data.hosts`): documents
    # shard::count of every source, global_batch / count rows per step. None = this process of all processes.
    data_shard: tuple[int, int] | None = None


class StageKind:
    """Base class and protocol of a stage kind (see the module docstring)."""

    name: str = ""

    def options(self, stage: str, raw: Mapping[str, Any], total_steps: int) -> dict[str, Any]:
        """The stage's validated `options` (defaults filled in); kinds without settings refuse any."""
        del total_steps
        if raw:
            raise ValueError(f"stage {stage!r}: kind {self.name!r} takes no options, got {sorted(raw)}")
        return {}

    def train_iterator(self, ctx: StageContext, phase: int, start_documents: Mapping[str, int]) -> Iterator:
        raise NotImplementedError

    def loss_fn(self, ctx: StageContext) -> Callable | None:
        return None

    def evaluate(self, ctx: StageContext, params: Any, phase: int, step: int) -> dict[str, float]:
        raise NotImplementedError

    def finish(self, ctx: StageContext, state: Any) -> dict[str, Any]:
        return {}

    def initial_params(self, ctx: StageContext, abstract_params: Any) -> tuple[Any, str] | None:
        """(params, description) a stage without checkpoints starts from instead of its init source, placed as
        `abstract_params` (ShapeDtypeStructs with the target shardings); None = the init source."""
        return None


_REGISTRY: dict[str, StageKind] = {}


def register(kind: StageKind) -> StageKind:
    if not kind.name:
        raise ValueError(f"stage kind {type(kind).__name__} has no name")
    if kind.name in _REGISTRY and type(_REGISTRY[kind.name]) is not type(kind):
        raise ValueError(f"stage kind {kind.name!r} is already registered by {type(_REGISTRY[kind.name]).__name__}")
    _REGISTRY[kind.name] = kind
    return kind


def get(name: str) -> StageKind:
    if name not in _REGISTRY:
        raise ValueError(f"unknown stage kind {name!r}; known: {names()}")
    return _REGISTRY[name]


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


class Pretrain(StageKind):
    """Next-token prediction on the stage's mixture of packed documents."""

    name = "pretrain"

    def train_iterator(self, ctx, phase, start_documents):
        p = ctx.stage.phases[phase]
        shard, shards = ctx.data_shard or (None, None)
        return pipeline.make_train_iterator(ctx.data_cfg, ctx.tokenizer, p.seq_len, p.global_batch,
                                            ctx.stage.iterator_seed(), process_index=shard, process_count=shards,
                                            start_documents=start_documents, track_documents=True)

    def evaluate(self, ctx, params, phase, step):
        p = ctx.stage.phases[phase]
        global_batch = int(ctx.config.eval.global_batch) or p.global_batch
        fn = ctx.eval_step(p.seq_len, global_batch)
        total = count = 0.0
        for b in pipeline.make_eval_iterator(ctx.data_cfg, ctx.tokenizer, p.seq_len, global_batch,
                                             num_batches=int(ctx.config.eval.batches)):
            s, n = jax.device_get(fn(params, ctx.to_device(b)))
            total, count = total + float(s), count + float(n)
        if count == 0:
            raise ValueError(f"stage {ctx.stage.name!r}: the evaluation split has no tokens")
        return {"loss": total / count, "perplexity": math.exp(min(total / count, 50.0)), "tokens": count}

    def finish(self, ctx, state):
        return {"samples": text_samples(ctx, state)}


def text_samples(ctx: StageContext, state) -> list[str]:
    """config.sample's prompts continued by the stage's model (written as text metrics)."""
    from llama_jax.infer import sampling  # noqa: PLC0415 - only needed at the end of a stage
    s = ctx.config.sample
    prompts = list(s.prompts)
    if not prompts or int(s.max_new_tokens) <= 0:
        return []
    tok = ctx.tokenizer
    ids = [tok.encode(p, bos=True) for p in prompts]
    cfg = ctx.stage.model.replace(remat="none")
    gen = sampling.generate(cfg, state.params, ids, max_new_tokens=int(s.max_new_tokens),
                            temperature=float(s.temperature), top_p=float(s.top_p), seed=int(s.seed),
                            stop_ids=tok.stop_ids)
    texts = [p + tok.decode(t) for p, t in zip(prompts, gen.tokens)]
    for t in texts:
        ctx.writer.write_text(int(jax.device_get(state.step)), f"{ctx.stage.name}/sample", t)
    return texts


register(Pretrain())

from llama_jax.train import long_context  # noqa: E402,F401 - registers `long_context` and `anneal`
from llama_jax.posttrain import stages as _posttrain_stages  # noqa: E402,F401 - registers the post-training kinds
