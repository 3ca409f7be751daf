"""`.pth` files read without torch: equal to torch.load on torch-saved files; pickled code is refused."""

import json
import os
import pickle
import subprocess
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from llama_jax.interop import pth

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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


# GLOBAL torch.FloatStorage, then BUILD with the state {"dtype": "object"}: it would set the shared storage type's
# dtype for every later load in the process.
_BUILD_ON_A_GLOBAL = (b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x06\x00\x00\x00objects"
                      b"b.")


def test_opcodes_that_change_a_whitelisted_global_are_refused(tmp_path):
    torch = pytest.importorskip("torch")
    torch.save({"w": torch.arange(4.0)}, tmp_path / "ok.pth")
    _zip_with_pickle(tmp_path / "build.pth", _BUILD_ON_A_GLOBAL)
    with pytest.raises(pickle.UnpicklingError, match=r"build\.pth: refusing to change the global "
                                                     r"torch\.FloatStorage \(BUILD opcode\)"):
        pth.load(tmp_path / "build.pth")
    # SETITEM into the OrderedDict class itself.
    _zip_with_pickle(tmp_path / "setitem.pth", b"\x80\x02ccollections\nOrderedDict\nX\x01\x00\x00\x00aK\x01s.")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to change the global collections\.OrderedDict "
                                                     r"\(SETITEM opcode\)"):
        pth.load(tmp_path / "setitem.pth")
    np.testing.assert_array_equal(pth.load(tmp_path / "ok.pth")["w"], np.arange(4.0, dtype=np.float32))
    # A state_dict() (an OrderedDict with `_metadata`, set by BUILD) still loads.
    torch.save(torch.nn.Linear(3, 2).state_dict(), tmp_path / "module.pth")
    assert list(pth.load(tmp_path / "module.pth")) == ["weight", "bias"]
    # A truncated pickle names the file.
    _zip_with_pickle(tmp_path / "cut.pth", _BUILD_ON_A_GLOBAL[:30])
    with pytest.raises(pickle.UnpicklingError, match=r"cut\.pth: malformed pickle"):
        pth.load(tmp_path / "cut.pth")


def test_convert_reports_a_refused_shard_in_one_line(tmp_path):
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": 4}))
    _zip_with_pickle(tmp_path / "meta" / "consolidated.00.pth", _BUILD_ON_A_GLOBAL)
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "llama_jax.convert", "--from=meta", "--to=llama_jax", "--input=meta",
                           "--output=out"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("llama_jax: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert errors[0].startswith("llama_jax: error: meta/consolidated.00.pth: refusing to change the global "
                                "torch.FloatStorage (BUILD opcode)"), errors[0]
    assert sorted(os.listdir(tmp_path)) == ["meta"]
