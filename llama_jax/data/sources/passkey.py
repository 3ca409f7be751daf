"""The ``passkey`` source kind: synthetic passkey-retrieval documents (:mod:`llama_jax.data.passkey`).

The documents are generated from the source's ``options`` (checked by :func:`check_options`), deterministic in
them; they need no ``path`` and no cache. The task's template lives in :mod:`llama_jax.data.passkey`, shared with
the needle evaluation (:mod:`llama_jax.infer.needle`), which draws its keys and filler from the other half.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from llama_jax.data import passkey as passkey_lib

if TYPE_CHECKING:
    from llama_jax.data.sources import SourceSpec

check_options = passkey_lib.check_options


def read(spec: SourceSpec, split: str, cache_dir: str | None) -> list[str]:  # pylint: disable=unused-argument
    """The source's documents of ``split`` ("train", "validation" or "all")."""
    return passkey_lib.documents(spec.name, spec.options, split)
