"""Read a W&B run file (`run-<id>.wandb`) back: here, for the summary an offline run keeps only there.

Why: `greenstack audit verify` checks the audit head anchored in the W&B summary; an online run also
writes `files/wandb-summary.json`, an offline one only this file. wandb >= 0.31 ships no reader: the
file is a 7-byte header (b":W&B", uint16 0xBEE1, uint8 version) followed by a LevelDB-style log of
32 KiB blocks whose chunks (crc32, uint16 length, uint8 type FULL/FIRST/MIDDLE/LAST) carry serialized
protobuf `Record`s.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK_BYTES, HEADER_BYTES = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def iter_records(path: str | Path) -> Iterator[Any]:
    """The protobuf `Record`s of a run file, in order; ValueError on a file that is not one (or is torn)."""
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


def items(entries: Any) -> dict[str, Any]:
    """A record's key/value_json items as a dict (nested keys joined with '/')."""
    return {(it.key or "/".join(it.nested_key)): json.loads(it.value_json) for it in entries}


def read_summary(path: str | Path) -> dict[str, Any]:
    """The run's summary as the file records it (later updates win)."""
    summary: dict[str, Any] = {}
    for record in iter_records(path):
        if record.WhichOneof("record_type") == "summary":
            summary.update(items(record.summary.update))
    return summary
