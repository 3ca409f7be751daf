"""Parts the post-training kinds share: data files of a stage, in-memory example iterators, batch layouts
with several rows per record, and the held-out task evaluation.

A data setting is a path, or `stage:<name>/<file>` (a `StageRef`): a file an earlier stage of the same run wrote
(rejection sampling writes `sft.jsonl`, `preferences.jsonl`, `stats.json`), so a round's data comes from the
previous round's model.

Batch layouts with several rows per record (reward: chosen, rejected, edited; DPO: chosen, rejected) are laid
out by `Collate` so that the loss finds each record's rows without knowing how the batch was assembled: each of
its strided grad_accum micro-batches, and the concatenation of the logical data shards' rows, keep every
record's rows adjacent (`split_roles`). m = records per step per data shard must be a multiple of grad_accum.

Data sharding: every train iterator reads the driver's logical data shard `ctx.data_shard` (shard k of S reads
records k::S, `global_batch / S` rows per step; `llama_jax.data.hosts`), so the global batch depends on S (fixed
when the stage starts, `data.host_shards`), not on the process count.
"""

from __future__ import annotations

import json
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from llama_jax import workdir as workdir_lib
from llama_jax.experiment import options as options_lib
from llama_jax.experiment.options import Spec, StageRef
from llama_jax.model import transformer
from llama_jax.posttrain import data as data_lib
from llama_jax.posttrain import rejection, significance
from llama_jax.sharding import mesh as mesh_lib
from llama_jax.train import kind as kind_lib
from llama_jax.train import loss as loss_lib
from llama_jax.train import resume


def resolve_path(ctx: kind_lib.StageContext, spec: Spec) -> str:
    """A data setting as a path: a path as it is, or the file a `stage:<name>/<file>` reference names."""
    if not isinstance(spec, StageRef):
        return spec
    if not spec.file:
        raise ValueError(f"stage {ctx.stage.name!r}: {str(spec)!r} must name a file: 'stage:<name>/<file>'")
    path = workdir_lib.stage_output_path(ctx.workdir, spec.stage, spec.file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"stage {ctx.stage.name!r}: {str(spec)!r} ({path}) does not exist; stage "
                                f"{spec.stage!r} must run before it and write it")
    return path


def data_shard(ctx: kind_lib.StageContext) -> tuple[int, int]:
    """(shard, shard count) of the logical data shard a train iterator reads (`llama_jax.data.hosts`; the driver
    sets `ctx.data_shard`), or this process of all processes outside the driver."""
    return ctx.data_shard or (jax.process_index(), jax.process_count())


def granule(stage, roles: int) -> int:
    """Rows a data shard must hold together: a record's `roles` rows times grad_accum (the `Collate` layout)."""
    return roles * stage.grad_accum


def local_rows(ctx: kind_lib.StageContext, phase: int, roles: int) -> tuple[int, int]:
    """(rows of this data shard per step, records per step) for the phase, checked against the layout."""
    p = ctx.stage.phases[phase]
    _, shards = data_shard(ctx)
    mesh_lib.check_global_batch(p.global_batch, shards=shards, roles=roles, grad_accum=ctx.stage.grad_accum,
                                where=f"stage {ctx.stage.name!r} ({ctx.stage.kind})")
    local = p.global_batch // shards
    return local, local // roles


def example_iterator(ctx: kind_lib.StageContext, elements: list, batch: int, seed: int, collate=None):
    """A checkpointable (grain) iterator over this data shard's part of `elements`: shard k of S reads elements
    k, k + S, ... of their one shuffled, repeated stream, batched, then `collate`d."""
    shard, shards = data_shard(ctx)
    if not elements:
        raise ValueError(f"stage {ctx.stage.name!r} ({ctx.stage.kind}): no training examples")
    ds = grain.MapDataset.source(elements).shuffle(seed=seed).repeat()
    if shards > 1:  # shard k: elements k, k + S, ... of the one shuffled, repeated stream (fewer examples than
        ds = ds[shard::shards]  # shards is fine)
    ds = ds.batch(batch, drop_remainder=True)
    if collate is not None:
        ds = ds.map(collate)
    # the rows are in memory already: read them on this thread (prefetch threads only cost start-up time)
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)))


def split_roles(x, roles: int):
    """[B, ...] in the `Collate` layout -> [roles] arrays of [B / roles, ...] (row i of each = one record)."""
    y = x.reshape((-1, roles) + x.shape[1:])
    return [y[:, r] for r in range(roles)]


class Collate:
    """{role: {key: [m, L]}} -> {key: [m x roles, L]}: rows ordered (group, role, j) for record g * n + j, with
    n = grad_accum; the driver's micro-batch i takes rows i::n, i.e. records g * n + i, one row per role, record
    by record (`split_roles`), and a batch of several data shards is their rows concatenated."""

    def __init__(self, roles, grad_accum: int = 1):
        self.roles, self.grad_accum = tuple(roles), int(grad_accum)

    def __call__(self, batch):
        out = {}
        for key in batch[self.roles[0]].keys():
            x = np.stack([batch[r][key] for r in self.roles])  # [R, m, ...]
            n, rest = self.grad_accum, x.shape[2:]
            x = x.reshape((len(self.roles), -1, n) + rest).swapaxes(0, 1)  # [m/n, R, n, ...]
            out[key] = x.reshape((-1,) + rest)
        return out


def host_batches(rows: list[dict], batch: int):
    """(real rows, padded batch) over `rows` in fixed-size batches (the last one padded with zero rows)."""
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        pad = [{k: np.zeros_like(v) for k, v in chunk[0].items()}] * (batch - len(chunk))
        yield len(chunk), {k: np.stack([r[k] for r in chunk + pad]) for k in chunk[0]}


def sequence_logps(cfg, params, batch):
    """[B] summed masked log-probs and [B] counted tokens, plus [B, L] per-token log-probs."""
    logits, _ = transformer.apply(cfg, params, batch["inputs"], batch["positions"], batch["segment_ids"])
    lp = loss_lib.token_logprobs(logits, batch["targets"])
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(lp * mask, axis=1), jnp.sum(mask, axis=1), lp


def start_params(ctx: kind_lib.StageContext):
    """The parameters the stage started from (its init source), on the stage's mesh."""
    return resume.start_params(ctx.workdir, ctx.stage, ctx.mesh, ctx.rules)


def compared_with(ctx: kind_lib.StageContext) -> list[str]:
    """The earlier stages of this run a stage's held-out scores are compared with (`posttrain.significance`):
    the stage it started from, then the stages whose outputs it reads (an average's sources; the rejection-
    sampling or annotation stage behind its data, whose scores are those of the model that was sampled)."""
    out = [ctx.stage.previous] if ctx.stage.previous else []
    return out + [s for s in options_lib.references(ctx.stage.options) if s not in out]


TASK_SCORES = significance.TASK_SCORES  # the stage's model: one verifier score per held-out prompt
START_SCORES = significance.START_SCORES  # the model the stage started from (sft from a pretrained model)


def task_eval(ctx: kind_lib.StageContext, params, eval_prompts: Spec, verifier: str, max_new_tokens: int,
              record: str = TASK_SCORES) -> dict[str, float]:
    """{"task_accuracy": mean verifier score of greedy answers to `eval_prompts`}, or {} when not configured. The
    per-prompt scores go to the stage's `record` file (the last evaluation's: the model the stage ends with), for
    the paired tests of `posttrain.significance`."""
    if not eval_prompts or not verifier:
        return {}
    records, _ = read_records(ctx, eval_prompts, "prompt")
    scores = rejection.task_scores(ctx.stage.model, params, ctx.tokenizer, records,
                                   rejection.load_verifier(verifier), int(max_new_tokens))
    if ctx.workdir and jax.process_index() == 0:
        workdir_lib.write_json_atomic(
            workdir_lib.stage_output_path(ctx.workdir, ctx.stage.name, record),
            dict(stage=ctx.stage.name, model="start" if record == START_SCORES else "stage",
                 compared_with=[] if record == START_SCORES else compared_with(ctx), prompts=str(eval_prompts),
                 verifier=verifier, scores=[float(s) for s in scores]))
    return {"task_accuracy": float(np.mean(scores))}


def report(ctx: kind_lib.StageContext, read: data_lib.ReadReport, too_long: int, weaker: int = 0) -> dict:
    """A data file's read report plus the records dropped as too long and, for preference data, as labelled
    weaker than the stage keeps (the kind's DONE.json `data`); a warning line and a text metric when any was
    skipped or dropped as too long."""
    used = read.kept - too_long - weaker
    out = dict(read.to_json(), too_long=too_long, used=used, **({"weaker": weaker} if weaker else {}))
    if read.skipped or too_long:
        logging.warning("stage %r: %s: used %d of %d records (%d malformed, %d longer than the sequence length)",
                        ctx.stage.name, read.path, used, read.total, read.skipped, too_long)
        ctx.writer.write_text(0, f"{ctx.stage.name}/data", json.dumps(out))
    return out


def read_records(ctx: kind_lib.StageContext, spec: Spec, kind: str) -> tuple[list[dict], data_lib.ReadReport]:
    """The valid records of a data setting; when an earlier stage's file holds none, the error names the stage
    that wrote it (e.g. a rejection-sampling round that formed no pairs)."""
    path = resolve_path(ctx, spec)
    try:
        return data_lib.read_jsonl(path, kind)
    except ValueError as e:
        if isinstance(spec, StageRef):
            raise ValueError(f"stage {ctx.stage.name!r}: {str(spec)!r}, written by stage {spec.stage!r}, holds "
                             f"no usable {kind} record ({e}); see {spec.stage!r}'s DONE.json") from None
        raise


def check_files(stage, *specs_and_kinds) -> None:
    """Reads each (spec, record kind) that is a path (files of earlier stages do not exist yet); errors name
    the stage and the file."""
    for spec, kind in specs_and_kinds:
        for one in spec if isinstance(spec, tuple) else (spec,):
            if one and not isinstance(one, StageRef):
                try:
                    data_lib.read_jsonl(one, kind)
                except ValueError as e:
                    raise ValueError(f"stage {stage.name!r} ({stage.kind}): {e}") from None


__all__ = ["Collate", "check_files", "data_shard", "example_iterator", "host_batches", "local_rows", "read_records", "report", "resolve_path",
           "sequence_logps", "split_roles", "start_params", "task_eval"]
