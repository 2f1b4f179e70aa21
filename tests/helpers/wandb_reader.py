"""Read a W&B offline run file (`run-<id>.wandb`) back: config, history rows and summary.

wandb >= 0.31 ships no reader for its offline files. They are a 7-byte header (b":W&B", uint16
0xBEE1, uint8 version) followed by a LevelDB-style log of 32 KiB blocks whose chunks
(crc32, uint16 length, uint8 type FULL/FIRST/MIDDLE/LAST) carry serialized protobuf `Record`s.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK_BYTES, HEADER_BYTES = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER_BYTES])
    if (ident, magic, version) != (b":W&B", 0xBEE1, 0):
        raise ValueError(f"{path}: not a W&B run file")
    pos, pending = HEADER_BYTES, b""
    while pos + HEADER_BYTES <= len(data):
        room = BLOCK_BYTES - pos % BLOCK_BYTES
        if room < HEADER_BYTES:
            pos += room
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER_BYTES])
        if length == 0 and kind == 0:
            break
        chunk = data[pos + HEADER_BYTES:pos + HEADER_BYTES + length]
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: bad checksum at byte {pos}")
        pos += HEADER_BYTES + length
        if kind == FULL:
            payload = chunk
        elif kind in (FIRST, MIDDLE):
            pending = chunk if kind == FIRST else pending + chunk
            continue
        elif kind == LAST:
            payload, pending = pending + chunk, b""
        else:
            raise ValueError(f"{path}: bad chunk type {kind}")
        record = pb.Record()
        record.ParseFromString(payload)
        yield record


def _items(items: Any) -> dict[str, Any]:
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in items}


def wait_complete(path: str | Path, timeout_s: float = 60.0) -> list[Any]:
    """The run file's records once its `exit` record is on disk.

    The file is written by the separate wandb-core process, which buffers 32 KiB blocks and may
    flush after `run.finish()` (or the training process) has returned; reading at once can see
    only the header on a loaded machine.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            records = list(iter_records(path))
        except ValueError:  # a block caught half-written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout_s:.0f} s ({len(records)} records)")
        time.sleep(0.2)


def read_run(path: str | Path) -> dict[str, Any]:
    """{"run_id", "config", "history": [row, ...], "summary"} of one finished offline run file."""
    out: dict[str, Any] = {"run_id": None, "config": {}, "history": [], "summary": {}}
    for record in wait_complete(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["run_id"] = record.run.run_id
            out["config"].update(_items(record.run.config.update))
        elif kind == "config":
            out["config"].update(_items(record.config.update))
        elif kind == "history":
            out["history"].append(_items(record.history.item))
        elif kind == "summary":
            out["summary"].update(_items(record.summary.update))
    return out


def find_run_files(run_dir: str | Path) -> list[Path]:
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
