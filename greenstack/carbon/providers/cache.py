"""On-disk cache of provider responses with a time-to-live.

Why: live APIs are rate-limited and sometimes down; a fresh cached answer avoids a call, and a stale
one is still a better fallback than a replayed year-old trace (it is labelled with its age).
Files are JSON, written atomically, one per request, named `<provider>_<zone>_<hash>.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_TTL_S = 3600.0


def default_cache_dir() -> Path:
    """$GREENSTACK_CACHE_DIR, else $XDG_CACHE_HOME/greenstack/carbon, else ~/.cache/greenstack/carbon."""
    if os.environ.get("GREENSTACK_CACHE_DIR"):
        return Path(os.environ["GREENSTACK_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "greenstack" / "carbon"


@dataclass(frozen=True)
class CacheEntry:
    """A cached payload and when it was stored (epoch seconds)."""

    payload: Any
    stored_at: float
    meta: dict[str, Any]

    def age_s(self, now: float | None = None) -> float:
        return (time.time() if now is None else now) - self.stored_at


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", text)


class DiskCache:
    """JSON files under `directory`; `get` honours the TTL unless `allow_stale`."""

    def __init__(self, directory: str | Path | None = None, ttl_s: float = DEFAULT_TTL_S) -> None:
        self.directory = Path(directory).expanduser() if directory else default_cache_dir()
        self.ttl_s = float(ttl_s)

    def path(self, provider: str, zone: str, request: dict[str, Any]) -> Path:
        digest = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self.directory / f"{_safe(provider)}_{_safe(zone)}_{digest}.json"

    def get(self, provider: str, zone: str, request: dict[str, Any], *, now: float | None = None,
            allow_stale: bool = False) -> CacheEntry | None:
        """The entry for this request if present (and fresh, unless allow_stale)."""
        entry = self._read(self.path(provider, zone, request))
        if entry is None:
            return None
        if not allow_stale and entry.age_s(now) > self.ttl_s:
            return None
        return entry

    def put(self, provider: str, zone: str, request: dict[str, Any], payload: Any, *,
            now: float | None = None) -> Path:
        """Store a payload atomically (a crash never leaves a half-written file)."""
        path = self.path(provider, zone, request)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"stored_at": time.time() if now is None else now, "meta": {"provider": provider, "zone": zone,
                                                                           "request": request},
               "payload": payload}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, default=str)
        os.replace(tmp, path)
        return path

    def entries(self, provider: str, zone: str) -> Iterator[CacheEntry]:
        """Every cached entry of a provider and zone, newest first (for stale fallback)."""
        if not self.directory.is_dir():
            return iter(())
        found = [e for p in self.directory.glob(f"{_safe(provider)}_{_safe(zone)}_*.json")
                 if (e := self._read(p)) is not None]
        return iter(sorted(found, key=lambda e: e.stored_at, reverse=True))

    @staticmethod
    def _read(path: Path) -> CacheEntry | None:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            return CacheEntry(doc["payload"], float(doc["stored_at"]), dict(doc.get("meta", {})))
        except (OSError, ValueError, KeyError, TypeError):
            return None  # missing or corrupt: as if not cached
