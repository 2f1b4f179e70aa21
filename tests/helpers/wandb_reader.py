"""Read a W&B offline run file (`run-<id>.wandb`) back: config, history rows and summary.

wandb >= 0.31 ships no reader for its offline files. They are a 7-byte header (b":W&B", uint16
0xBEE1, uint8 version) followed by a LevelDB-style log of 32 KiB blocks whose chunks
(crc32, uint16 length, uint8 type FULL/FIRST/MIDDLE/LAST) carry serialized protobuf `Record`s.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from greenstack.tracking.wandb_file import items as _items
from greenstack.tracking.wandb_file import iter_records


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
