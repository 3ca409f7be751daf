"""Stage kinds, one module each, above the kind-agnostic training engine (`llama_jax.train`).

`KINDS` is the table the entry points pass to `experiment.resolve(config, kinds)` and
`train.driver.run_experiment(config, workdir, kinds)`. A new kind is one module here (a `train.kind.StageKind`
subclass, with its options in `stages.options` or beside it) plus one line in this table.
"""

from __future__ import annotations

from types import MappingProxyType

from llama_jax.stages.anneal import Anneal
from llama_jax.stages.annotation import PreferenceAnnotation
from llama_jax.stages.average import Average
from llama_jax.stages.dpo import DPO
from llama_jax.stages.long_context import LongContext
from llama_jax.stages.pretrain import Pretrain
from llama_jax.stages.rejection import RejectionSampling
from llama_jax.stages.reward import Reward
from llama_jax.stages.sft import SFT

KINDS = MappingProxyType({kind.name: kind for kind in (
    Pretrain(),
    LongContext(),
    Anneal(),
    SFT(),
    Reward(),
    RejectionSampling(),
    PreferenceAnnotation(),
    DPO(),
    Average(),
)})

__all__ = ["KINDS"]
