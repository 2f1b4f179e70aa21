"""CPU package and DRAM energy from the Linux powercap RAPL counters (Intel; AMD Zen on Linux >= 5.8).

Layout read (`root` defaults to /sys/class/powercap, injectable for tests):
    intel-rapl:N/name         = "package-N"  -> component "cpu"
    intel-rapl:N:M/name       = "dram"       -> component "ram"
                                "core" / "uncore" are parts of the package: skipped (no double count)
    intel-rapl:N/name         = "psys"       -> whole platform, overlaps the package: skipped
    */energy_uj, */max_energy_range_uj

The counters are node-wide (every process on the socket), so only one process per node should read
them. They wrap around at `max_energy_range_uj` (minutes at high power), so the monitor must call
`poll()` more often than that; a negative delta is corrected by adding the range.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from greenstack.energy.meters import Meter, MeterUnavailable

_ZONE_RE = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
PERMISSION_FIX = "sudo chmod o+r /sys/class/powercap/intel-rapl:*/energy_uj (or run as root)"


@dataclass
class RaplZone:
    """One RAPL domain that greenstack counts."""

    zone_id: str
    name: str
    component: str
    energy_path: Path
    max_energy_range_uj: int | None
    last_raw_uj: int = 0
    accumulated_uj: int = 0
    wraps: int = 0


def _read_int(path: Path) -> int:
    """Read an integer sysfs file, turning permission problems into a clear MeterUnavailable."""
    try:
        return int(path.read_text().strip())
    except PermissionError as exc:
        raise MeterUnavailable(
            f"rapl: permission denied reading {path} (RAPL counters are root-only since CVE-2020-8694); "
            f"fix: {PERMISSION_FIX}") from exc
    except (OSError, ValueError) as exc:
        raise MeterUnavailable(f"rapl: cannot read {path}: {exc}") from exc


def _discover(root: Path) -> list[tuple[str, Path]]:
    """Zone ids and directories, from the class dir and nested under each package, deduplicated."""
    found: dict[str, Path] = {}
    candidates = list(root.iterdir())
    for top in list(candidates):
        if _ZONE_RE.match(top.name) and top.is_dir():
            candidates.extend(p for p in top.iterdir() if _ZONE_RE.match(p.name))
    for path in candidates:
        if _ZONE_RE.match(path.name) and path.is_dir() and path.name not in found:
            found[path.name] = path
    return sorted(found.items(), key=lambda kv: tuple(int(x or -1) for x in _ZONE_RE.match(kv[0]).groups()))


class RaplMeter(Meter):
    """Measured CPU package (and DRAM, where the platform exposes it) energy from RAPL counters."""

    name = "rapl"
    provenance = "measured"
    scope = "node"

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self.root = Path(root)
        if not self.root.exists():
            raise MeterUnavailable(f"rapl: {self.root} not present (no RAPL powercap driver, e.g. in a VM)")
        self.zones: list[RaplZone] = []
        skipped: list[str] = []
        try:
            discovered = _discover(self.root)
        except OSError as exc:
            raise MeterUnavailable(f"rapl: cannot list {self.root}: {exc}") from exc
        for zone_id, path in discovered:
            try:
                name = (path / "name").read_text().strip()
            except OSError:
                skipped.append(f"{zone_id} (unreadable name)")
                continue
            is_sub = _ZONE_RE.match(zone_id).group(2) is not None
            if name.startswith("package") and not is_sub:
                component = "cpu"
            elif name == "dram":
                component = "ram"
            else:  # core/uncore (inside the package), psys (overlaps the package), unknown
                skipped.append(f"{zone_id}={name}")
                continue
            max_range: int | None
            try:
                max_range = _read_int(path / "max_energy_range_uj")
            except MeterUnavailable:
                max_range = None
            self.zones.append(RaplZone(zone_id, name, component, path / "energy_uj", max_range))
        self.skipped = skipped
        if not any(z.component == "cpu" for z in self.zones):
            raise MeterUnavailable(f"rapl: no intel-rapl package domain under {self.root}")
        for zone in self.zones:  # fail now, with the fix, rather than mid-run
            zone.last_raw_uj = _read_int(zone.energy_path)
        self.components = tuple(c for c in ("cpu", "ram") if any(z.component == c for z in self.zones))
        counts = Counter(z.name for z in self.zones)
        self.source = "rapl:" + "+".join(n if k == 1 else f"{n}×{k}" for n, k in counts.items())

    def start(self) -> None:
        for zone in self.zones:
            zone.last_raw_uj = _read_int(zone.energy_path)
            zone.accumulated_uj = 0
            zone.wraps = 0

    def _update(self) -> None:
        for zone in self.zones:
            raw = _read_int(zone.energy_path)
            delta = raw - zone.last_raw_uj
            if delta < 0:
                zone.wraps += 1
                # Without a known range a reset cannot be corrected: drop that interval, never go negative.
                delta = delta + zone.max_energy_range_uj if zone.max_energy_range_uj else 0
                delta = max(delta, 0)
            zone.accumulated_uj += delta
            zone.last_raw_uj = raw

    def poll(self) -> None:
        """Fold the counters into the running totals so that a wraparound is never missed."""
        self._update()

    def read_energy_j(self) -> dict[str, float]:
        self._update()
        out = dict.fromkeys(self.components, 0.0)
        for zone in self.zones:
            out[zone.component] += zone.accumulated_uj / 1e6
        return out

    def stop(self) -> None:
        self._update()

    def info(self) -> dict[str, Any]:
        details = super().info()
        details["zones"] = [{"zone": z.zone_id, "name": z.name, "component": z.component,
                             "path": str(z.energy_path), "max_energy_range_uj": z.max_energy_range_uj,
                             "wraps": z.wraps} for z in self.zones]
        details["skipped_zones"] = list(self.skipped)
        return details
