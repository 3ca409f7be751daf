"""The one place that reaches into private JAX (`jax._src`), each use guarded by a public fallback.

`saved_residuals(f, *args)` lists what the backward pass of `f` keeps from its forward pass. JAX computes that
list in `jax._src.ad_checkpoint.saved_residuals` and prints it through the public
`jax.ad_checkpoint.print_saved_residuals`. The private function is used while it exists and answers in the
expected form; otherwise (a JAX upgrade moved or changed it) the public printer's output is parsed instead,
which gives the same list (one `<dtype>[<shape>] <source>` line per residual). Only if both fail is an error
raised, naming the JAX version.
"""

from __future__ import annotations

import contextlib
import io
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging


class Residual(NamedTuple):
    """One array the backward pass keeps: its shape, dtype and JAX's description of where it comes from
    ("from the argument ..." for an input of `f`, "output of <primitive> from <file:line>" otherwise)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    source: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * jnp.dtype(self.dtype).itemsize

    @property
    def is_argument(self) -> bool:
        return "argument" in self.source


def _private_saved_residuals() -> Callable | None:
    try:
        from jax._src.ad_checkpoint import saved_residuals  # noqa: PLC0415 - private; guarded by the fallback
    except (ImportError, AttributeError):
        return None
    return saved_residuals


def saved_residuals(f: Callable, *args: Any) -> list[Residual]:
    """The residuals JAX saves for the backward pass of `f(*args)` (abstract `jax.ShapeDtypeStruct` args are
    fine: nothing is computed)."""
    private = _private_saved_residuals()
    if private is not None:
        try:
            return [Residual(tuple(int(d) for d in aval.shape), jnp.dtype(aval.dtype), str(source))
                    for aval, source in private(f, *args)]
        except (TypeError, AttributeError, ValueError) as e:
            logging.warning("jax._src.ad_checkpoint.saved_residuals (JAX %s) failed (%s); reading "
                            "jax.ad_checkpoint.print_saved_residuals instead", jax.__version__, e)
    return printed_saved_residuals(f, *args)


_LINE = re.compile(r"(?P<dtype>[^\s\[]+)\[(?P<shape>[^\]]*)\]\S*\s+(?P<source>.*)")


def _dtype_from_short(name: str) -> np.dtype:
    """JAX's short dtype names (f32, bf16, i32, u8, f8_e4m3fn, c64, bool) back to dtypes."""
    for short, full in (("bf", "bfloat"), ("f", "float"), ("u", "uint"), ("i", "int"), ("c", "complex")):
        if name.startswith(short) and name[len(short):][:1].isdigit():
            name = full + name[len(short):]
            break
    return jnp.dtype(name)


def printed_saved_residuals(f: Callable, *args: Any) -> list[Residual]:
    """`saved_residuals` through the public `jax.ad_checkpoint.print_saved_residuals`, its output parsed."""
    from jax import ad_checkpoint  # noqa: PLC0415

    printer = getattr(ad_checkpoint, "print_saved_residuals", None)
    if printer is None:
        raise RuntimeError(f"cannot read the saved residuals of JAX {jax.__version__}: neither "
                           "jax._src.ad_checkpoint.saved_residuals nor jax.ad_checkpoint.print_saved_residuals "
                           "is usable")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        printer(f, *args)
    residuals = []
    for line in out.getvalue().splitlines():
        if not line.strip():
            continue
        m = _LINE.fullmatch(line.strip())
        try:
            if m is None:
                raise ValueError("no <dtype>[<shape>] prefix")
            shape = tuple(int(re.match(r"\d+", d.strip()).group()) for d in m["shape"].split(",") if d.strip())
            residuals.append(Residual(shape, _dtype_from_short(m["dtype"]), m["source"]))
        except (TypeError, AttributeError, ValueError) as e:
            raise RuntimeError(f"cannot read the saved residuals of JAX {jax.__version__}: the line {line!r} "
                               f"of jax.ad_checkpoint.print_saved_residuals does not parse ({e})") from e
    return residuals
