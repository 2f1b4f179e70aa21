"""The ledger next to a tokenisation cache: who prepared it, with which energy and emissions, and which
training runs used it since.

`<cache>.ledger.jsonl` holds append-only JSON lines: a `prepare` record (the `greenstack data prepare`
job's run id, run dir and figures), then one `use` per training run that read the cache. A training run
reports the prepare job's energy and emissions divided by the number of runs that used the cache so far,
itself included (`data/prepare_energy_kwh_share`, `data/prepare_kg_co2e_share`), and names the prepare
run in `data/prepare_run`. Why a ledger file and not a database: it lives and moves with the cache, and
single O_APPEND writes keep concurrent sweep jobs' records whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from greenstack.provenance import Figure

LEDGER_SUFFIX = ".ledger.jsonl"
PREPARE_FIGURES = {"energy/total_kwh": ("data/prepare_energy_kwh_share", "kWh"),
                   "carbon/total_kg_co2e": ("data/prepare_kg_co2e_share", "kgCO2eq")}


# -- the ledger next to the cache --------------------------------------------------------------------
def ledger_path(cache_path: Path) -> Path:
    """`<cache>.ledger.jsonl` beside the cache file it describes."""
    return cache_path.with_name(cache_path.stem + LEDGER_SUFFIX)


def read_ledger(path: Path) -> list[dict[str, Any]]:
    """The ledger's records; a torn last line (a crash mid-append) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One JSON line in a single O_APPEND write: concurrent sweep jobs never interleave their records (after
    a torn last line, from a crash mid-write, the record starts on a line of its own)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    with open(path, "rb") if path.is_file() else open(os.devnull, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            line = line if f.read(1) == b"\n" else b"\n" + line
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def latest_prepare(records: Sequence[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[str]]:
    """(the last `prepare` record, the run ids that used the cache after it, in order, once each)."""
    prepared, users = None, []
    for record in records:
        if record.get("event") == "prepare":
            prepared, users = record, []
        elif record.get("event") == "use" and prepared is not None and record.get("run_id") not in users:
            users.append(str(record.get("run_id")))
    return prepared, users


def attach_prepare_share(data: Any, *, run_id: str, run_dir: str | Path) -> None:
    """A training run that read a prepared cache: record its use in the ledger and add the amortised share
    of the prepare job's energy and emissions to `data.figures` (they go into sustainability.json).

    Nothing happens when the run tokenised the data itself (its own figures hold that energy) or the data
    is not cached. A cache hit without a prepare record says so (`data/prepare_run`, no share).
    """
    cache, hit = getattr(data, "cache_path", None), getattr(data, "cache_hit", False)
    if cache is None or not hit:
        return
    ledger = ledger_path(Path(cache))
    prepared, users = latest_prepare(read_ledger(ledger))
    figures = getattr(data, "figures", None)
    if figures is None:
        return
    if prepared is None:
        figures["data/prepare_run"] = Figure(None, "", "fallback", f"tokenisation cache {cache} was written by an "
                                             "earlier training run, not by `greenstack data prepare`: its energy is "
                                             "in that run's own figures")
        return
    if run_id not in users:
        append_record(ledger, {"event": "use", "run_id": run_id, "run_dir": str(Path(run_dir).resolve()),
                         "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        users.append(run_id)
    n = users.index(run_id) + 1  # runs that used it so far, this one included (a resumed run keeps its place)
    where = f"prepare run {prepared.get('run_id')} ({prepared.get('run_dir')}/sustainability.json)"
    for key, (share_key, unit) in PREPARE_FIGURES.items():
        fig = (prepared.get("figures") or {}).get(key) or {}
        value = fig.get("value")
        if isinstance(value, (int, float)):
            figures[share_key] = Figure(value / n, unit, fig.get("provenance", "estimated"),
                                        f"{where}: {key} {value:.6g} {unit} / {n} run{'s' if n != 1 else ''} that used "
                                        f"cache {Path(cache).name} so far (ledger {ledger})")
        else:
            figures[share_key] = Figure(None, unit, "fallback", f"{where} has no {key}")
    figures["data/prepare_run"] = Figure(str(prepared.get("run_id")), "", "measured",
                                         f"{where}; cache {cache}; {n} of {len(users)} runs so far")
