"""Small file helpers: atomic writes so an interrupted run never leaves a half-written output."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def publish(tmp: str | Path, path: str | Path) -> None:
    """Give a temp file normal permissions (mkstemp makes it 0600) and rename it into place."""
    os.chmod(tmp, _umask_mode())
    os.replace(tmp, path)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def jsonable(value: Any) -> Any:
    """Plain JSON types, the one converter of decision records, audit logs and trackers: mappings with
    text keys, lists for tuples and arrays, Python numbers for numpy/torch scalars, ISO-8601 text for
    datetimes (UTC when aware), None for NaN/inf, anything else as its text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return (value.astimezone(timezone.utc) if value.tzinfo else value).isoformat()
    if callable(getattr(value, "tolist", None)):  # numpy and torch: scalars -> numbers, arrays -> lists
        return jsonable(value.tolist())
    return str(value)


#: the key under which `dumps` lists the values it had to write as null
NON_FINITE_KEY = "non_finite"


def finite_json(obj: Any, path: str = "") -> tuple[Any, list[str]]:
    """`obj` with every nan/inf float replaced by None, and where each was ("metrics.train/loss.value: nan").

    Standard JSON has no NaN or Infinity: Python writes them bare by default, and strict readers
    (browsers, jq, most languages) then reject the whole file.
    """
    if isinstance(obj, float) and not math.isfinite(obj):
        return None, [f"{path or '<root>'}: {obj}"]
    if isinstance(obj, dict):
        out, notes = {}, []
        for k, v in obj.items():
            out[k], found = finite_json(v, f"{path}.{k}" if path else str(k))
            notes += found
        return out, notes
    if isinstance(obj, (list, tuple)):
        pairs = [finite_json(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return [p[0] for p in pairs], [n for p in pairs for n in p[1]]
    return obj, []


def dumps(obj: Any, **kwargs: Any) -> str:
    """`json.dumps` that never writes bare NaN/Infinity: such values become null, and an object at the top
    gets a `non_finite` list saying which they were (a note instead of invalid JSON)."""
    clean, notes = finite_json(obj)
    if notes and isinstance(clean, dict):
        clean[NON_FINITE_KEY] = notes
    return json.dumps(clean, allow_nan=False, **kwargs)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (dumps(obj, indent=2, sort_keys=False) + "\n").encode())
