"""The tracker interface and the always-on local JSONL writer."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from greenstack.io import dumps, jsonable

RUN_ID_FILE = ".greenstack/run_id"


def load_or_create_run_id(run_dir: str | Path) -> str:
    """The run's id, kept in the run dir so a resumed run (and its W&B run) keeps the same id."""
    path = Path(run_dir) / RUN_ID_FILE
    if path.is_file():
        run_id = path.read_text().strip()
        if run_id:
            return run_id
    run_id = uuid.uuid4().hex[:12]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


class Tracker:
    """Base tracker: subclasses send metrics somewhere; all methods are safe no-ops here."""

    name = "none"

    def start(self, *, run_dir: Path, run_id: str, run_name: str, config: dict[str, Any]) -> None:
        """Open the run (called once, before training)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Record step-aligned metrics."""

    def summary(self, values: dict[str, Any]) -> None:
        """Record end-of-run figures."""

    def finish(self, exit_code: int = 0) -> None:
        """Close the run; always called (in `finally`) so multirun jobs never share a run."""

    def describe(self) -> str:
        return self.name


class NullTracker(Tracker):
    """`tracker=none`: only the local metrics.jsonl is written."""


class JsonlWriter:
    """Writes one JSON object per logged dict to `metrics.jsonl`; every line carries `step`.

    With `keep_rows`, it also keeps the file's rows as parsed objects (`rows`: an earlier segment's, read
    once when it opens, then every row it writes), so the end-of-run report needs no second read.
    """

    def __init__(self, run_dir: str | Path, filename: str = "metrics.jsonl", *, keep_rows: bool = False) -> None:
        self.path = Path(run_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        #: the file's rows (None: not kept, or an earlier segment left a line that is not JSON)
        self.rows: list[dict[str, Any]] | None = _earlier_rows(self.path) if keep_rows else None
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": step, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        record.update(jsonable(metrics))
        line = dumps(record)  # standard JSON: never a bare NaN
        self._file.write(line + "\n")
        self._file.flush()
        if self.rows is not None:
            self.rows.append(json.loads(line))  # exactly what a reader of the file gets

    def close(self) -> None:
        self._file.close()


def _earlier_rows(path: Path) -> list[dict[str, Any]] | None:
    """The rows a resumed run's earlier segments wrote (None when a line is not JSON: readers report it)."""
    if not path.is_file():
        return []
    rows: list[dict[str, Any]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            return None
        if isinstance(row, dict):
            rows.append(row)
    return rows


class Fanout:
    """Sends each log call to several sinks (the JSONL writer and the tracker)."""

    def __init__(self, *sinks: Any) -> None:
        self.sinks = sinks

    def log(self, metrics: dict[str, Any], step: int) -> None:
        for sink in self.sinks:
            sink.log(metrics, step)
