"""`.pth` files read without torch: equal to torch.load on torch-saved files; pickled code is refused."""

import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from llama_jax.interop import pth


def _as_numpy(t):
    import torch  # noqa: PLC0415

    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.contiguous().numpy()


def test_matches_torch_load_on_torch_saved_files(tmp_path):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    objects = {
        "f32": torch.randn(3, 5, generator=g),
        "bf16": torch.randn(4, 7, generator=g).to(torch.bfloat16),
        "f16": torch.randn(9, generator=g).to(torch.float16),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.arange(-5, 7),
        "i32": torch.arange(12, dtype=torch.int32).reshape(3, 4),
        "u8": torch.arange(200, 210, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),  # non-contiguous: strides of a view
        "sliced": base[2:5, 3:9],  # a storage offset into a shared storage
        "shared": base,
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
        "parameter": torch.nn.Parameter(torch.ones(2, 3)),
    }
    torch.save(objects, tmp_path / "x.pth")
    want = torch.load(tmp_path / "x.pth", weights_only=True)
    got = pth.load(tmp_path / "x.pth")
    assert list(got) == list(want)
    for name, t in want.items():
        expected = _as_numpy(t.detach())
        assert got[name].dtype == expected.dtype and got[name].shape == expected.shape, name
        np.testing.assert_array_equal(got[name], expected, err_msg=name)
    # Views share the file's bytes; nothing is writable.
    assert not got["f32"].flags.writeable


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_pickled_code_is_refused_without_running(tmp_path):
    marker = str(tmp_path / "ran")
    _zip_with_pickle(tmp_path / "evil.pth", pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load the global (posix|nt|os)\.mkdir"):
        pth.load(tmp_path / "evil.pth")
    assert not os.path.exists(marker)
    # A bare pickle (not torch's zip format) is named as such, and not unpickled.
    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
    with pytest.raises(ValueError, match="not a torch zip checkpoint"):
        pth.load(tmp_path / "plain.pth")
    assert not os.path.exists(marker)


def test_storage_bounds_are_checked(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.arange(4.0)}, tmp_path / "ok.pth")
    with zipfile.ZipFile(tmp_path / "ok.pth") as z:
        entries = {n: z.read(n) for n in z.namelist()}
    name = next(n for n in entries if n.endswith("data.pkl"))
    # Claim 400 elements in a storage of 4: refused instead of reading past the storage.
    entries[name] = entries[name].replace(b"K\x04t", b"M\x90\x01t")
    with zipfile.ZipFile(tmp_path / "bad.pth", "w", compression=zipfile.ZIP_STORED) as z:
        for n, data in entries.items():
            z.writestr(n, data)
    with pytest.raises(pickle.UnpicklingError, match="shorter than|past"):
        pth.load(tmp_path / "bad.pth")
