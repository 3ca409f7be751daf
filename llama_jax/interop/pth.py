"""Reads PyTorch `.pth` files (`torch.save`'s zip format) without torch, running no code from the file.

    load(path) -> {name: numpy array}   (read-only views of a memory map of the file; nothing copied)

The format: a zip archive (entries stored uncompressed) holding `<archive>/data.pkl`, a pickle of the saved
object whose tensors refer by key to raw storages `<archive>/data/<key>`, plus `<archive>/byteorder`. The pickle
is read by an unpickler that resolves only the globals a saved tensor needs (`torch._utils._rebuild_tensor_v2`,
`torch._utils._rebuild_parameter`, the typed storage classes such as `torch.BFloat16Storage`, and
`collections.OrderedDict`) to local numpy functions; any other global (the way a pickle runs code) is refused
with `pickle.UnpicklingError` naming the file. So are the opcodes that change an object already built (BUILD,
SETITEM(S), APPEND(S), ADDITEMS) unless it is a dict, list or set of the pickle's own: otherwise a file could
alter a whitelisted global (a storage type's dtype, a function's defaults) for every later load in the process.
BUILD is accepted on an OrderedDict only, and its state (a `state_dict()`'s `_metadata`) is dropped. The pickle
is run by pickle's Python implementation, whose opcodes can be checked one by one (a `data.pkl` is small: the
tensors' bytes are not in it). A malformed pickle is an `UnpicklingError` naming the file too.

A tensor becomes a strided numpy view of its storage (bfloat16 through `ml_dtypes`), so reading a multi-GB
shard costs address space, not memory: pages are read when used.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import struct
import zipfile
from typing import Any, Callable, NoReturn

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")  # a zip local file header (30 bytes)


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
    name: str
    dtype: np.dtype


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):  # noqa: ARG001 - torch's signature
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride) or any(s < 0 for s in (*size, *stride)) or storage_offset < 0:
        raise pickle.UnpicklingError(f"tensor with invalid size {size} / stride {stride}")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if all(size) else storage_offset - 1
    if last >= storage.size:
        raise pickle.UnpicklingError(f"tensor of size {size} (offset {storage_offset}, stride {stride}) reads past "
                                     f"its storage of {storage.size} elements")
    if not all(size):
        return np.zeros(size, storage.dtype)
    base = storage[storage_offset:]
    view = np.lib.stride_tricks.as_strided(base, shape=size, strides=[s * storage.itemsize for s in stride],
                                           writeable=False)
    return view


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):  # noqa: ARG001
    return data


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{("torch", name): _StorageType(name, np.dtype(dtype)) for name, dtype in _STORAGE_DTYPES.items()},
}
_CONTAINERS = (dict, collections.OrderedDict, list, set)  # what a pickle may change: the ones it made


class _Unpickler(pickle._Unpickler):  # pylint: disable=protected-access - the Python implementation: see above
    dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

    def __init__(self, file, storages, where: str):
        super().__init__(file)
        self._storages, self._where = storages, where

    def refuse_change(self, target, opcode: str) -> NoReturn:
        what = next((f"the global {module}.{name}" for (module, name), v in _ALLOWED.items() if v is target),
                    f"an object of type {type(target).__name__}")
        raise pickle.UnpicklingError(f"{self._where}: refusing to change {what} ({opcode} opcode): only tensors, "
                                     "dicts and lists are read from .pth files (this file is crafted or corrupt)")

    def load_build(self):
        state, target = self.stack.pop(), self.stack[-1]
        if type(target) is not collections.OrderedDict:
            self.refuse_change(target, "BUILD")
        del state  # an OrderedDict's attributes: a state_dict()'s `_metadata` (module versions), not needed

    dispatch[pickle.BUILD[0]] = load_build

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._where}: refusing to load the global {module}.{name}: only tensors, dicts and lists are "
                "read from .pth files (this file carries other objects or code)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"{self._where}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        return self._storages(str(key), storage_type.dtype, int(numel))


def _check_target(opcode: str, target: Callable[[_Unpickler], Any]) -> None:
    """Makes `opcode` refuse to change anything but one of the pickle's own containers (`target` finds it)."""
    load = _Unpickler.dispatch[getattr(pickle, opcode)[0]]

    def checked(unpickler: _Unpickler):
        if type(target(unpickler)) not in _CONTAINERS:
            unpickler.refuse_change(target(unpickler), opcode)
        load(unpickler)

    _Unpickler.dispatch[getattr(pickle, opcode)[0]] = checked


# After a MARK the opcode's items are on `stack` and the object they go into is on top of the stack below it.
_check_target("SETITEM", lambda u: u.stack[-3])
_check_target("APPEND", lambda u: u.stack[-2])
for _opcode in ("SETITEMS", "APPENDS", "ADDITEMS"):
    _check_target(_opcode, lambda u: u.metastack[-1][-1])


def _data_offset(f, info: zipfile.ZipInfo) -> int:
    f.seek(info.header_offset)
    header = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
    if header[0] != b"PK\x03\x04":
        raise ValueError(f"bad zip local header for {info.filename}")
    return info.header_offset + _LOCAL_HEADER.size + header[-2] + header[-1]


def load(path: str | os.PathLike) -> Any:
    """The object saved in a `torch.save` zip file, tensors as read-only numpy arrays mapped from the file."""
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path!r} is not a torch zip checkpoint (the legacy pre-1.6 torch format is not read; "
                         "re-save it with a current torch)")
    with zipfile.ZipFile(path) as z:
        infos = {i.filename: i for i in z.infolist()}
        pkl = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pkl) != 1:
            raise ValueError(f"{path!r}: expected one <archive>/data.pkl entry, found {pkl}")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = z.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in infos else "little"
        if byteorder != "little":
            raise ValueError(f"{path!r}: byteorder {byteorder!r} is not supported (only little-endian)")
        pickled = z.read(pkl[0])
        with open(path, "rb") as f:
            offsets = {name[len(prefix + "data/"):]: (_data_offset(f, info), info)
                       for name, info in infos.items() if name.startswith(prefix + "data/")}
    buffer = np.memmap(path, dtype=np.uint8, mode="r") if offsets else None

    def storage(key: str, dtype: np.dtype, numel: int) -> np.ndarray:
        if key not in offsets:
            raise pickle.UnpicklingError(f"{path!r}: storage {key!r} is missing from the archive")
        start, info = offsets[key]
        nbytes = numel * dtype.itemsize
        if info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes:
            raise pickle.UnpicklingError(f"{path!r}: storage {key!r} is compressed or shorter than {nbytes} bytes")
        return buffer[start:start + nbytes].view(dtype)

    import io  # noqa: PLC0415

    try:
        return _Unpickler(io.BytesIO(pickled), storage, where=path).load()
    except (EOFError, IndexError, KeyError, TypeError, AttributeError, ValueError, struct.error) as e:
        raise pickle.UnpicklingError(f"{path}: malformed pickle in {pkl[0]} ({type(e).__name__}: {e})") from e
