"""The training state pytree."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates applied so far
    params: Any
    opt_state: Any
    skipped: jax.Array  # int32 scalar: steps whose update was skipped for a non-finite loss or gradient
