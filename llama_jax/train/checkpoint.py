"""Checkpoints: one Orbax CheckpointManager per stage holding the train state, the data-iterator state and
run metadata, written atomically (Orbax writes to a temporary directory and renames it when complete).

Layout: `<stage_dir>/checkpoints/<step>/{state,data,meta}`.
  * state: the TrainState (params, optimizer state, step, skipped), restored onto any mesh by giving the target
    shardings (Orbax reshards on read);
  * data: the data-iterator state (JSON), so a resumed run continues with exactly the next batch: for a
    `data.hosts.ShardedTrainIterator` the state of every logical data shard, gathered from all processes, so a
    restart with another process count resumes the same stream (the one data-item format);
  * meta: JSON (phase index, tokens seen, skipped data windows, ...).
Retention: keep the last `keep` checkpoints plus every `keep_every`-th step. A checkpoint that fails to restore
(corrupted or partially deleted after it was committed) is moved aside to `<step>.corrupt` and the previous
one is used, with a warning.

Checksums: once a save is committed, process 0 writes `<step>/checksums.json` (atomically: a temporary file
renamed into place) with the size and CRC-32 of every file of the checkpoint; a restore first verifies them
(`verify_checkpoint`), so bytes flipped on disk after the save (bit rot, a bad copy) are reported as
`CorruptCheckpointError` naming the file instead of restoring wrong numbers. The checksums of an async save are
written as soon as it commits (a watcher thread sees Orbax rename its temporary folder into place); a checkpoint
without a checksum file (the process died between the commit and the checksums, or an older run) restores
unverified.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from typing import Any, Callable, Sequence

import jax
import orbax.checkpoint as ocp
from absl import logging

from llama_jax.data import hosts


CHECKSUM_FILE = "checksums.json"
_CHUNK = 16 * 1024 * 1024


class CheckpointSaveError(OSError):
    """A checkpoint could not be written (full disk, unwritable folder): the run stops at once."""


def _reason(e: BaseException) -> str:
    """Why a save failed, in a few words: the OS error when TensorStore names one, else the error's first line."""
    text = first_line(e, limit=2000)
    for code, words in ((28, "no space left on device"), (13, "permission denied"), (30, "read-only file system")):
        if f"os_error_code='{code}'" in text or f"[Errno {code}]" in text:
            return words
    return text[:300]


class CorruptCheckpointError(ValueError):
    """A committed checkpoint whose files no longer match the checksums written with it (or are missing)."""


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _checkpoint_files(step_dir: str) -> list[str]:
    files = []
    for root, _, names in os.walk(step_dir):
        files += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(f for f in files if f != CHECKSUM_FILE and not f.startswith(CHECKSUM_FILE + ".tmp"))


def write_checksums(step_dir: str) -> dict:
    """Writes `<step_dir>/checksums.json`: size and CRC-32 of every file of a committed checkpoint."""
    files = {rel: {"size": os.path.getsize(os.path.join(step_dir, rel)), "crc32": _crc32(os.path.join(step_dir, rel))}
             for rel in _checkpoint_files(step_dir)}
    record = {"algorithm": "crc32", "files": files}
    tmp = os.path.join(step_dir, f"{CHECKSUM_FILE}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(step_dir, CHECKSUM_FILE))
    return record


def verify_checkpoint(step_dir: str) -> bool:
    """Checks a checkpoint directory (`.../checkpoints/<step>`) against its checksums.json.

    Returns True when every listed file is present with its recorded size and CRC-32, False when the checkpoint
    has no checksum file (nothing to verify); raises `CorruptCheckpointError` (one line naming the checkpoint
    and the first bad file) otherwise.
    """
    path = os.path.join(step_dir, CHECKSUM_FILE)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CorruptCheckpointError(f"checkpoint {step_dir}: unreadable {CHECKSUM_FILE} ({e})") from None
    for rel, want in sorted(files.items()):
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            raise CorruptCheckpointError(f"checkpoint {step_dir}: file {rel} is missing")
        size = os.path.getsize(full)
        if size != want["size"]:
            raise CorruptCheckpointError(f"checkpoint {step_dir}: file {rel} has {size} bytes, "
                                         f"{want['size']} were written")
        crc = _crc32(full)
        if crc != want["crc32"]:
            raise CorruptCheckpointError(f"checkpoint {step_dir}: file {rel} fails its checksum "
                                         f"(crc32 {crc:08x}, {want['crc32']:08x} written): its bytes changed on disk")
    return True


def _check_iterator(iterator: Any) -> hosts.ShardedTrainIterator:
    if not isinstance(iterator, hosts.ShardedTrainIterator):
        raise TypeError(f"checkpointed data iterators are data.hosts.ShardedTrainIterator, got "
                        f"{type(iterator).__name__}")
    return iterator


class StageCheckpoints:
    """Save / restore for one stage. `iterator` is the stage's `data.hosts.ShardedTrainIterator` (its gathered
    JSON state is the checkpoint's data item)."""

    def __init__(self, directory: str, keep: int = 3, keep_every: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        self._unchecksummed: list[int] = []  # saved steps whose checksums are not written yet
        self._in_flight: list[int] = []  # steps saved since the last wait (named when a wait finds a save failed)
        self._lock = threading.Lock()
        self._failed = False  # a save failed (`wait` raised CheckpointSaveError)
        self._options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, keep_period=keep_every or None, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True)
        self._manager = self._open()

    def _open(self) -> ocp.CheckpointManager:
        return ocp.CheckpointManager(self.directory, options=self._options,
                                     item_names=("state", "data", "meta"))

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, iterator: Any | None, meta: dict, force: bool = False) -> bool:
        """Starts an (async) save of `state`, the iterator position and `meta` at `step`."""
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if step in self._manager.all_steps():
            return False
        if iterator is not None:
            items["data"] = ocp.args.JsonSave(_check_iterator(iterator).global_state())  # a collective: every process saves
        self.wait()  # the previous save is committed (Orbax would wait here too): write its checksums first
        with self._lock:  # queued before the save starts: its commit callback writes its checksums
            self._unchecksummed.append(step)
        saved = self._manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            with self._lock:
                self._in_flight.append(step)
        if not saved:
            with self._lock:
                self._unchecksummed.remove(step)
        elif not self._options.enable_async_checkpointing:
            self._write_checksums()
        elif jax.process_index() == 0:  # checksums as soon as the async save commits, not at the next wait
            threading.Thread(target=self._checksum_on_commit, args=(step,), daemon=True,
                             name=f"checksums-{step}").start()
        return saved

    def _checksum_on_commit(self, step: int) -> None:
        """Waits for checkpoint `step` to commit (Orbax renames its temporary folder to `<step>` as the last act
        of a save) and writes its checksums: the newest checkpoint, the one a crash-resume restores, is verified
        too. Gives up quietly when the step leaves the pending list (a wait wrote them, or the save failed)."""
        step_dir = os.path.join(self.directory, str(step))
        while True:
            with self._lock:
                if step not in self._unchecksummed:
                    return
            if os.path.isdir(step_dir):
                self._write_checksums(committed_only=True)
                return
            time.sleep(0.05)

    def _write_checksums(self, committed_only: bool = False) -> None:
        """Checksums of the saves not checksummed yet. After a wait every save has committed (a missing folder
        is a failed save, dropped); `committed_only` keeps the saves still in flight pending."""
        with self._lock:
            pending, self._unchecksummed = self._unchecksummed, []
            for step in pending:
                step_dir = os.path.join(self.directory, str(step))
                if not os.path.isdir(step_dir):
                    if committed_only:
                        self._unchecksummed.append(step)
                    continue
                if jax.process_index() == 0 and not os.path.exists(os.path.join(step_dir, CHECKSUM_FILE)):
                    write_checksums(step_dir)

    def verify(self, step: int) -> bool:
        """`verify_checkpoint` of checkpoint `step` (raises `CorruptCheckpointError` when its bytes changed)."""
        return verify_checkpoint(os.path.join(self.directory, str(step)))

    def delete(self, step: int) -> None:
        self._manager.delete(step)

    def wait(self) -> None:
        """Until the last save is committed; a save that failed (full disk, unwritable folder) is a
        `CheckpointSaveError` naming the step and the folder."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - Orbax re-raises its background thread's error as it was
            # the steps saved since the last wait (not the pending checksums: a checksum thread may have taken
            # a committed step off that list before the failure surfaced)
            with self._lock:
                failed, self._in_flight, self._unchecksummed = list(self._in_flight), [], []
            self._failed = True
            raise CheckpointSaveError(f"checkpoint step {', '.join(map(str, failed)) or '?'} could not be saved in "
                                      f"{self.directory}: {_reason(e)}") from e
        with self._lock:
            self._in_flight = []
        self._write_checksums()

    def restore(self, step: int, abstract_state: Any, iterator: Any | None) -> tuple[Any, dict]:
        """Restores step `step` onto the shardings in `abstract_state` (ShapeDtypeStructs with .sharding);
        sets `iterator` to the saved position. Returns (state, meta). Verifies the checkpoint's checksums first
        (`CorruptCheckpointError` when its files changed on disk)."""
        self.verify(step)
        items = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
        if iterator is not None:
            _check_iterator(iterator)
            items["data"] = ocp.args.JsonRestore()
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if iterator is not None:
            iterator.set_state(restored["data"])
        return restored["state"], dict(restored["meta"] or {})

    def read_meta(self, step: int) -> dict:
        """The JSON metadata of checkpoint `step` alone (cheap: no arrays are read)."""
        return dict(self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"] or {})

    def restore_latest(self, abstract_state: Any, iterator_factory) -> tuple[int, Any, Any, dict] | None:
        """Restores the newest checkpoint that reads back cleanly: (step, state, iterator, meta), or None.

        `iterator_factory(meta_or_None)` builds a fresh iterator for the checkpoint's data phase; a checkpoint
        that fails to restore is moved aside (`<step>.corrupt`) with a warning and the previous one is tried.
        """
        def restore(step):
            iterator = iterator_factory(self.read_meta(step))
            state, meta = self.restore(step, abstract_state, iterator)
            return state, iterator, meta

        step, restored, _ = first_restorable(self.directory, self.all_steps(), restore, on_failure=self.quarantine)
        return None if step is None else (step, *restored)

    def state_shapes(self, step: int) -> dict[str, tuple]:
        """{tree path (`path_names`): shape} of the arrays in checkpoint `step`'s train state (metadata only)."""
        with ocp.PyTreeCheckpointer() as ckptr:
            tree = ckptr.metadata(os.path.join(self.directory, str(step), "state")).item_metadata.tree
        return {path_names(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(tree)
                if hasattr(v, "shape")}

    def quarantine(self, step: int) -> None:
        """Moves checkpoint `step` aside to `<step>.corrupt-<time>` (kept for inspection, never restored)."""
        self._quarantine(step)

    def _quarantine(self, step: int) -> None:
        path = os.path.join(self.directory, str(step))
        if jax.process_index() == 0 and os.path.exists(path):
            os.replace(path, f"{path}.corrupt-{int(time.time())}")
        self._manager = self._open()

    def close(self) -> None:
        if self._failed:  # after a failed save the manager's threads are broken: closing it only adds tracebacks
            return
        self.wait()
        self._manager.close()


def first_restorable(directory: str, steps: Sequence[int], restore: Callable[[int], Any],
                     on_failure: Callable[[int], None] | None = None, keep: tuple[type, ...] = ()
                     ) -> tuple[int | None, Any, list[tuple[int, str]]]:
    """The one walk back past unreadable checkpoints: `restore(step)` for `steps` newest first until one
    succeeds. Returns (step, its result, [(failed step, why)]), or (None, None, failures) when none restores.

    A failure is logged as one warning line naming the checkpoint and why, and `on_failure(step)` is called
    (e.g. to move it aside). Exceptions of the `keep` types (and `hosts.ReshardError`: the checkpoint is fine,
    this process count cannot split its data) are not failures of the checkpoint and propagate."""
    failures = []
    for step in sorted(steps, reverse=True):
        try:
            return step, restore(step), failures
        except (hosts.ReshardError, *keep):
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means this checkpoint is unusable
            failures.append((step, f"{type(e).__name__}: {first_line(e)}"))
            logging.warning("checkpoint %s/%d could not be restored (%s)", directory, step, failures[-1][1])
            if on_failure is not None:
                on_failure(step)
    return None, None, failures


def load_params(directory: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
    """Params only, from a stage checkpoint directory (`.../checkpoints`) or a workdir stage: for `init_from`
    and for the next stage. Returns (params, step)."""
    restored, step, _ = load_state_items(directory, {"params": abstract_params}, step)
    return restored["params"], step


def load_state_items(directory: str, abstract: dict, step: int | None = None,
                     with_meta: bool = False) -> tuple[dict, int, dict]:
    """Some items of a checkpoint's train state (`abstract`: {"params": ..., "opt_state": ...} of abstract
    arrays with their shardings), from the newest checkpoint or `step`: (items, step, meta or {})."""
    manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data", "meta"))
    steps = sorted(manager.all_steps())
    if not steps:
        raise FileNotFoundError(f"no checkpoint found in {directory!r}")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise FileNotFoundError(f"checkpoint step {step} not found in {directory!r}; available: {steps}")
    verify_checkpoint(os.path.join(os.path.abspath(directory), str(step)))
    args = {"state": ocp.args.PyTreeRestore(item=abstract, restore_args=jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype),
        abstract), partial_restore=True)}
    if with_meta:
        args["meta"] = ocp.args.JsonRestore()
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    manager.close()
    return restored["state"], step, dict(restored.get("meta") or {}) if with_meta else {}


def list_steps(directory: str) -> list[int]:
    """Committed checkpoint steps in a stage's checkpoint directory (none if it does not exist)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def path_names(path) -> str:
    """A pytree path as "a/b/0/c", the same for dataclass fields, dict keys and sequence indices."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (TensorStore errors run to hundreds of lines), without the
    TensorStore spec that Orbax appends to array read errors."""
    lines = str(e).split(" See full TensorStore details")[0].strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:limit]
