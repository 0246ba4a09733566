"""Reads back what an offline W&B run wrote: the records of its ``run-<id>.wandb`` transaction log.

The file is a LevelDB-style log (wandb's ``datastore`` format): a 7-byte file header (":W&B", magic, version),
then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type) and a protobuf ``Record``
payload, split FIRST/MIDDLE/LAST across blocks when long.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path, wait: float = 60.0) -> list[pb.Record]:
    """Every protobuf Record in a ``.wandb`` file, in order.

    ``run.finish()`` can return before W&B's service process has flushed the log's tail to disk (seen on a
    loaded 2-core machine: the history record missing), so this re-reads the file until its ``exit`` record is
    there, for at most ``wait`` seconds, and then returns what it has.
    """
    deadline = time.monotonic() + wait
    while True:
        try:
            out = _parse(Path(path).read_bytes(), path)
        except Exception:  # a record cut off mid-write
            if time.monotonic() > deadline:
                raise
        else:
            if any(r.WhichOneof("record_type") == "exit" for r in out) or time.monotonic() > deadline:
                return out
        time.sleep(0.1)


def _parse(data: bytes, path: str | Path) -> list[pb.Record]:
    ident, _magic, _version = struct.unpack("<4sHB", data[:HEADER])
    assert ident == b":W&B", f"{path} is not a W&B transaction log"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # the tail of a block too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:  # zero padding
            continue
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _items(path: str | Path, kind: str, field: str) -> list[dict[str, object]]:
    """For each record of ``kind``, its ``field`` items as a dict of JSON-decoded values."""
    return [
        {_key(i): json.loads(i.value_json) for i in getattr(getattr(r, kind), field)}
        for r in records(path)
        if r.WhichOneof("record_type") == kind
    ]


def history(path: str | Path) -> list[dict[str, object]]:
    """The logged history rows (``wandb.log`` calls)."""
    return _items(path, "history", "item")


def config(path: str | Path) -> dict[str, object]:
    """The run config as logged (last value of each key)."""
    return {k: v for update in _items(path, "config", "update") for k, v in update.items()}


def summary(path: str | Path) -> dict[str, object]:
    """The run summary as last updated (``run.summary``)."""
    return {k: v for update in _items(path, "summary", "update") for k, v in update.items()}


def run(path: str | Path) -> dict[str, object]:
    """The run record: group, display name, tags and job type as W&B stored them."""
    record = next(r.run for r in records(path) if r.WhichOneof("record_type") == "run")
    return {
        "group": record.run_group,
        "name": record.display_name,
        "tags": list(record.tags),
        "job_type": record.job_type,
    }
