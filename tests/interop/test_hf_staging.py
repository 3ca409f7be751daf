"""HF saves staged in `<out>.tmp-*`: what a killed save leaves behind is removed by the next save to the same
path; the staging folder of a save still running is kept."""

import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time

from llama_jax.interop import hf
from tests.interop.helpers import random_params, tiny_cfg

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from llama_jax.interop import hf
    from tests.interop.helpers import random_params, tiny_cfg
    real_save_file = hf.save_file
    def save_then_die(tensors, filename, metadata=None):
        real_save_file(tensors, filename, metadata=metadata)
        os.kill(os.getpid(), signal.SIGKILL)  # dies mid-save, after its first shard
    hf.save_file = save_then_die
    cfg = tiny_cfg()
    hf.save(sys.argv[1], cfg, random_params(cfg), shard_size=20000)
""")


def test_a_killed_save_leaves_nothing_behind_after_the_next_save(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _KILLED_SAVE, str(out)], env=env, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    (killed,) = tmp_path.glob("out.tmp-*")
    assert any(f.endswith(".tmp") for f in os.listdir(killed)) and not out.exists()

    legacy = tmp_path / "out.tmp-legacy"  # no lock file, an hour old: an older version's leftover
    legacy.mkdir()
    (legacy / "shard-00000.tmp").write_bytes(b"x" * 1000)
    os.utime(legacy, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / "out.tmp-live"  # a save in progress in another process: its lock is held
    live.mkdir()
    fd = os.open(live / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        cfg = tiny_cfg()
        hf.save(out, cfg, random_params(cfg), shard_size=20000)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp-live"]
        assert ".lock" not in os.listdir(out) and "model.safetensors.index.json" in os.listdir(out)
    finally:
        os.close(fd)
    assert hf.remove_stale_staging(out) == [str(live)]  # once its lock is released it is stale too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
