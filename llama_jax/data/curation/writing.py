"""Writing the curation output: ArrayRecord shards, the combined stat events, the atomic publish.

Shards are assigned by a stable hash of the document key and written in key order, so 1 and N workers write
byte-identical shards. Everything is written to a sibling staging directory ``OUTPUT.tmp-<random>`` (each
shard as a hidden ``.inprogress`` file renamed when closed) and renamed to ``OUTPUT`` only after the pipeline
succeeded and the stats are written; a failed run removes its staging directory and leaves ``OUTPUT`` untouched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid

import apache_beam as beam

from llama_jax.data.curation.records import PASSTHROUGH_FIELDS, key_order

EVENTS_FILE = "_events.json"
SHARD_PATTERN = "part-{:05d}-of-{:05d}.array_record"


def output_record(record: dict) -> dict:
    """The JSON object written for a kept document (internal fields dropped)."""
    out = {"text": record["text"]}
    for field in (*PASSTHROUGH_FIELDS, "language", "language_score", "domain", "quality", "lines_removed",
                  "heuristics", "pii"):
        if field in record:
            out[field] = record[field]
    return out


class WriteShard(beam.DoFn):
    """Writes one shard's records in key order to a hidden ``.inprogress`` file, then renames it."""

    def __init__(self, directory: str, num_shards: int):
        self.directory, self.num_shards = directory, num_shards

    def process(self, element):
        from array_record.python import array_record_module  # noqa: PLC0415

        shard, groups = element
        records = sorted(groups["docs"], key=key_order)
        name = SHARD_PATTERN.format(shard, self.num_shards)
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".{name}.inprogress")
        writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
        try:
            for record in records:
                writer.write(json.dumps(output_record(record), ensure_ascii=False).encode("utf-8"))
        finally:
            writer.close()
        os.replace(tmp, final)
        yield ("shard", name, len(records), os.path.getsize(final))


class WriteEvents(beam.DoFn):
    """Writes the combined stat events (one element) to ``path`` (read back by the launching process)."""

    def __init__(self, path: str):
        self.path = path

    def process(self, acc):
        tmp = self.path + ".inprogress"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(acc, f)
        os.replace(tmp, self.path)


def check_output(output_dir: str, overwrite: bool) -> None:
    """Refuses an output that holds results (unless ``overwrite``) or that cannot be created: under a file, or
    where the nearest existing folder is not writable (a read-only filesystem or permissions)."""
    if os.path.exists(output_dir):
        if not os.path.isdir(output_dir):
            raise ValueError(f"curate: output {output_dir!r} exists and is not a directory")
        if os.listdir(output_dir) and not overwrite:
            raise ValueError(f"curate: output directory {output_dir!r} already holds results; pass --overwrite "
                             "to replace them")
    existing = os.path.dirname(output_dir)  # the staging directory and the rename happen in the parent
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"curate: cannot write output {output_dir!r}: {existing!r} is a file, not a "
                                 "directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"curate: cannot write output {output_dir!r}: {existing!r} is not writable")


@dataclasses.dataclass(frozen=True)
class Staging:
    """The staging directory beside the output; :meth:`publish` moves it into place, :meth:`discard` removes it
    and any parent folder :meth:`create` made."""

    path: str
    output_dir: str
    created: str | None  # the outermost parent folder create() made, if any

    @classmethod
    def create(cls, output_dir: str) -> Staging:
        parent = os.path.dirname(output_dir)
        created, existing = None, parent
        while not os.path.exists(existing):
            created, existing = existing, os.path.dirname(existing)
        staging = cls(f"{output_dir}.tmp-{uuid.uuid4().hex[:8]}", output_dir, created)
        try:
            os.makedirs(parent, exist_ok=True)
            os.makedirs(staging.path)
        except OSError as e:
            staging.discard()
            raise PermissionError(f"curate: cannot write output {output_dir!r}: {e.strerror or e}") from e
        return staging

    def publish(self) -> None:
        """Moves the finished staging directory to the output (replacing what was there)."""
        old = None
        if os.path.exists(self.output_dir):
            old = f"{self.output_dir}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.output_dir, old)
        os.rename(self.path, self.output_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        if self.created is None:
            return
        folder = os.path.dirname(self.output_dir)
        while True:  # the parents this run made, innermost first, while empty
            try:
                os.rmdir(folder)
            except OSError:
                return
            if folder == self.created:
                return
            folder = os.path.dirname(folder)
