"""Background energy sampling for a training run, recorded as UTC time intervals.

A daemon thread polls every meter each `interval_s` and records the cumulative joules per component.
The training loop may call `sample()` at step/epoch boundaries: that only appends a timestamp (about a
microsecond, no I/O, no lock), and `intervals()` later splits the recorded energy at those boundaries by
linear interpolation of the cumulative curve. `sample(read=True)` takes a real synchronous reading
instead (for epoch ends, where a few milliseconds do not matter).

Consumers (accounting, carbon) take `intervals()` / `as_arrays()` and multiply each interval's energy
by the grid carbon intensity at that time; `binned_kwh(3600)` gives energy per UTC hour directly. PUE
is NOT applied here: it is stored and labelled, and applied downstream.

Distributed runs: the NVML and RAPL counters are node-wide, so exactly one process per node must run a
monitor (`should_meter()`: local rank 0). Summing monitors across nodes then counts every device once.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from greenstack.energy.meters import COMPONENTS, Meter
from greenstack.errors import ConfigError
from greenstack.provenance import Figure, weakest

log = logging.getLogger(__name__)

J_PER_KWH = 3.6e6
_MAX_ERRORS_KEPT = 20


def should_meter(local_rank: int | None = None) -> bool:
    """True only on local rank 0: node-wide counters must be read by one process per node.

    Without an argument reads LOCAL_RANK (torchrun), then SLURM_LOCALID (srun); absent = rank 0.
    """
    if local_rank is None:
        raw = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
        try:
            local_rank = int(raw)
        except ValueError as exc:
            raise ConfigError("local rank must be an integer", key="LOCAL_RANK", value=raw) from exc
    return local_rank == 0


@dataclass(frozen=True)
class EnergyInterval:
    """Energy used per component between two UTC instants."""

    start: datetime
    end: datetime
    energy_j: dict[str, float]

    @property
    def duration_s(self) -> float:
        return (self.end - self.start).total_seconds()

    @property
    def total_energy_j(self) -> float:
        return float(sum(self.energy_j.values()))

    def energy_kwh(self) -> dict[str, float]:
        return {k: v / J_PER_KWH for k, v in self.energy_j.items()}


class EnergyMonitor:
    """Samples meters in a daemon thread; reports intervals, totals and labelled figures."""

    def __init__(self, meters: Sequence[Meter], interval_s: float = 1.0, pue: float = 1.0,
                 clock: Callable[[], float] | None = None, *, pue_source: str | None = None) -> None:
        """`clock` returns monotonic seconds (injectable for tests); UTC times are anchored at start()."""
        if not meters:
            raise ConfigError("no energy meter to run", key="energy.meters", value=[],
                              fix="use greenstack.energy.select_meters()")
        if not interval_s > 0:
            raise ConfigError("sampling interval must be > 0 s", key="energy.interval_s", value=interval_s)
        if not pue >= 1.0:
            raise ConfigError("PUE must be >= 1.0", key="energy.pue", value=pue)
        self.meters = list(meters)
        self.interval_s = float(interval_s)
        self.pue = float(pue)
        if pue_source is not None:
            self.pue_source, self.pue_provenance = pue_source, "estimated"
        elif self.pue == 1.0:
            self.pue_source, self.pue_provenance = "pue:1.0 (default)", "fallback"
        else:
            self.pue_source, self.pue_provenance = f"pue:{self.pue:g} (configured)", "estimated"
        self.components = tuple(c for c in COMPONENTS if any(c in m.components for m in self.meters))
        self._clock = clock or time.monotonic
        self._read_lock = threading.Lock()  # serialises meter I/O (thread vs sample(read=True))
        self._data_lock = threading.Lock()  # guards the reading lists, held only to append/copy
        self._t: list[float] = []
        self._cum: list[tuple[float, ...]] = []
        self._last_by_meter: list[dict[str, float]] = [dict.fromkeys(m.components, 0.0) for m in self.meters]
        self._marks = array("d")
        self._labels: list[tuple[float, str]] = []
        self._thread: threading.Thread | None = None
        self._stop_event = threading.Event()
        self._t0: float | None = None
        self.started_at: datetime | None = None
        self.stopped = False
        self.errors: list[str] = []
        self.idle_power_w: dict[str, float] | None = None
        self.idle_duration_s: float | None = None

    # --- lifecycle ---
    def start(self, background: bool = True) -> EnergyMonitor:
        """Zero all meters, record the first reading and (by default) start the sampling thread."""
        if self._t0 is not None:
            raise RuntimeError("EnergyMonitor already started")
        with self._read_lock:
            for meter in self.meters:
                meter.start()
            self._t0 = self._clock()
            self.started_at = datetime.now(timezone.utc)
            with self._data_lock:
                self._t.append(self._t0)
                self._cum.append(tuple(0.0 for _ in self.components))
        if background:
            self._thread = threading.Thread(target=self._run, name="greenstack-energy", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop_event.wait(self.interval_s):
            self._read()

    def stop(self) -> None:
        """Stop the thread, take the final reading and stop the meters (idempotent)."""
        if self._t0 is None or self.stopped:
            return
        self._stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 30.0)
        self._read(final=True)
        self.stopped = True

    def __enter__(self) -> EnergyMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- sampling ---
    def _read(self, final: bool = False) -> None:
        with self._read_lock:
            t_before = self._clock()
            for i, meter in enumerate(self.meters):
                try:
                    if final:
                        meter.stop()
                    else:
                        meter.poll()
                    values = meter.read_energy_j()
                except Exception as exc:  # a flaky meter must never kill the training run
                    msg = f"{meter.name}: {type(exc).__name__}: {exc}"
                    if len(self.errors) < _MAX_ERRORS_KEPT:
                        self.errors.append(msg)
                    log.warning("energy meter read failed (keeping its last value): %s", msg)
                    continue
                self._last_by_meter[i] = {c: float(values.get(c, 0.0)) for c in meter.components}
            t = (t_before + self._clock()) / 2.0
            cum = tuple(sum(last.get(c, 0.0) for last in self._last_by_meter) for c in self.components)
            with self._data_lock:
                if t <= self._t[-1]:  # same instant (coarse or fake clock): newest values win
                    self._cum[-1] = cum
                else:
                    self._t.append(t)
                    self._cum.append(cum)

    def sample(self, label: str | None = None, *, read: bool = False) -> None:
        """Mark a boundary (step/epoch end) for `intervals()`; `read=True` also reads the meters now.

        Without `read` this is an O(1) append of a timestamp: safe to call every ~10 ms step.
        """
        t = self._clock()
        self._marks.append(t)
        if label is not None:
            self._labels.append((t, label))
        if read and self._t0 is not None and not self.stopped:
            self._read()

    # --- results ---
    def _snapshot(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        with self._data_lock:
            ts = np.array(self._t, dtype=float)
            cum = np.array(self._cum, dtype=float).reshape(len(self._t), len(self.components))
        marks = np.frombuffer(self._marks.tobytes(), dtype=float)
        return ts, cum, marks

    def _boundaries(self, boundaries: str) -> tuple[np.ndarray, np.ndarray]:
        """Boundary times (monotonic s) and cumulative joules there (rows) for the chosen boundaries."""
        ts, cum, marks = self._snapshot()
        if boundaries not in ("all", "samples", "marks"):
            raise ValueError("boundaries must be 'all', 'samples' or 'marks'")
        if len(ts) == 0:
            return ts, cum
        inside = marks[(marks > ts[0]) & (marks < ts[-1])]
        if boundaries == "samples":
            points = ts
        elif boundaries == "marks":
            points = np.unique(np.concatenate([ts[:1], inside, ts[-1:]]))
        else:
            points = np.unique(np.concatenate([ts, inside]))
        if len(ts) == 1:
            return points[:1], cum[:1]
        values = np.column_stack([np.interp(points, ts, cum[:, k]) for k in range(cum.shape[1])]) \
            if cum.shape[1] else np.zeros((len(points), 0))
        return points, values

    def _to_epoch_s(self, t: np.ndarray) -> np.ndarray:
        assert self.started_at is not None and self._t0 is not None
        return self.started_at.timestamp() + (t - self._t0)

    def intervals(self, boundaries: str = "all") -> list[EnergyInterval]:
        """Recorded energy as consecutive UTC intervals.

        boundaries: "all" = every thread reading and every `sample()` mark; "samples" = thread readings
        only; "marks" = only the `sample()` marks (e.g. one interval per epoch) plus start and end.
        Marks after the latest reading appear once the next reading (or `stop()`) lands.
        """
        points, values = self._boundaries(boundaries)
        if len(points) < 2 or self.started_at is None or self._t0 is None:
            return []
        deltas = np.diff(values, axis=0)
        out = []
        for i in range(len(points) - 1):
            start = self.started_at + timedelta(seconds=float(points[i] - self._t0))
            end = self.started_at + timedelta(seconds=float(points[i + 1] - self._t0))
            out.append(EnergyInterval(start, end, {c: float(deltas[i, k]) for k, c in enumerate(self.components)}))
        return out

    def as_arrays(self, boundaries: str = "all") -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """(start POSIX s, end POSIX s, {component: kWh per interval}) for vectorised accounting."""
        points, values = self._boundaries(boundaries)
        if len(points) < 2 or self.started_at is None:
            return np.zeros(0), np.zeros(0), {c: np.zeros(0) for c in self.components}
        epoch = self._to_epoch_s(points)
        deltas = np.diff(values, axis=0) / J_PER_KWH
        return epoch[:-1], epoch[1:], {c: deltas[:, k] for k, c in enumerate(self.components)}

    def binned_kwh(self, bin_s: float = 3600.0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Energy per fixed UTC bin (default: clock hours), splitting intervals pro rata in time.

        Returns (bin start POSIX s, {component: kWh per bin}); for hourly carbon-intensity accounting.
        """
        starts, ends, kwh = self.as_arrays("samples")
        if len(starts) == 0:
            return np.zeros(0), {c: np.zeros(0) for c in self.components}
        first = math.floor(starts[0] / bin_s)
        n_bins = max(math.ceil(ends[-1] / bin_s) - first, 1)
        out = {c: np.zeros(n_bins) for c in self.components}
        for i, (a, b) in enumerate(zip(starts, ends, strict=True)):
            span = b - a
            lo = math.floor(a / bin_s)
            while True:
                edge = (lo + 1) * bin_s
                seg_end = min(b, edge)
                share = (seg_end - a) / span if span > 0 else 1.0
                for c in self.components:
                    out[c][lo - first] += kwh[c][i] * share
                if b <= edge:
                    break
                a, lo = edge, lo + 1
        return (first + np.arange(n_bins)) * bin_s, out

    def marks(self) -> list[tuple[datetime, str]]:
        """The labelled `sample()` marks as (UTC time, label)."""
        if self.started_at is None or self._t0 is None:
            return []
        return [(self.started_at + timedelta(seconds=t - self._t0), label) for t, label in list(self._labels)]

    def duration_s(self) -> float:
        """Seconds between start and the latest reading."""
        with self._data_lock:
            return self._t[-1] - self._t[0] if self._t else 0.0

    def total_energy_j(self) -> dict[str, float]:
        """Joules per component from start to the latest reading."""
        with self._data_lock:
            if not self._cum:
                return dict.fromkeys(self.components, 0.0)
            first, last = self._cum[0], self._cum[-1]
        return {c: last[k] - first[k] for k, c in enumerate(self.components)}

    def total_kwh(self) -> float:
        """Total energy over all components, kWh (before PUE)."""
        return sum(self.total_energy_j().values()) / J_PER_KWH

    def measure_idle_baseline(self, duration_s: float, *, sleep: Callable[[float], None] = time.sleep) -> dict[str, float]:
        """Mean power per component while nothing runs, before `start()`.

        Lets reports give dynamic energy = total - idle power x duration (what the training itself
        added). Only meaningful for node-wide counters; the process-tree models idle near zero anyway.
        """
        if self._t0 is not None:
            raise RuntimeError("measure the idle baseline before start()")
        if not duration_s > 0:
            raise ValueError("duration_s must be > 0")
        with self._read_lock:
            for meter in self.meters:
                meter.start()
            t0 = self._clock()
            steps = max(math.ceil(duration_s / self.interval_s), 1)
            for _ in range(steps):
                sleep(duration_s / steps)
                for meter in self.meters:
                    meter.poll()
            elapsed = self._clock() - t0
            energy = dict.fromkeys(self.components, 0.0)
            for meter in self.meters:
                for c, v in meter.read_energy_j().items():
                    energy[c] = energy.get(c, 0.0) + v
        self.idle_duration_s = elapsed
        self.idle_power_w = {c: (e / elapsed if elapsed > 0 else 0.0) for c, e in energy.items()}
        return dict(self.idle_power_w)

    def dynamic_energy_j(self) -> dict[str, float] | None:
        """Total minus idle power x duration, per component, floored at zero; None without a baseline."""
        if self.idle_power_w is None:
            return None
        duration = self.duration_s()
        return {c: max(e - self.idle_power_w.get(c, 0.0) * duration, 0.0) for c, e in self.total_energy_j().items()}

    def _label(self, components: Sequence[str]) -> tuple[str, str]:
        involved = [m for m in self.meters if any(c in m.components for c in components)]
        prov = weakest(*(m.provenance for m in involved)) if involved else "fallback"
        return prov, " + ".join(m.source for m in involved)

    def figures(self) -> dict[str, Figure]:
        """Energy figures (kWh, before PUE) with provenance = weakest meter involved."""
        totals = self.total_energy_j()
        prov, source = self._label(self.components)
        figs = {"energy/total_kwh": Figure(sum(totals.values()) / J_PER_KWH, "kWh", prov, source)}
        for c in self.components:
            c_prov, c_source = self._label([c])
            figs[f"energy/{c}_kwh"] = Figure(totals[c] / J_PER_KWH, "kWh", c_prov, c_source)
        figs["energy/duration_s"] = Figure(self.duration_s(), "s", "measured", "monitor:monotonic clock")
        figs["energy/pue"] = Figure(self.pue, "ratio", self.pue_provenance, self.pue_source)
        dynamic = self.dynamic_energy_j()
        if dynamic is not None and self.idle_power_w is not None:
            base = f"{source}; idle baseline over {self.idle_duration_s:.3g} s"
            figs["energy/idle_power_w"] = Figure(sum(self.idle_power_w.values()), "W", prov, base)
            figs["energy/dynamic_kwh"] = Figure(sum(dynamic.values()) / J_PER_KWH, "kWh", prov,
                                                f"total - idle power × duration; {base}")
        if self.errors:
            figs["energy/meter_errors"] = Figure(len(self.errors), "count", "measured", "; ".join(self.errors[:3]))
        return figs

    def info(self) -> dict[str, Any]:
        """Configuration and meter details for the run record."""
        return {"interval_s": self.interval_s, "pue": self.pue, "pue_source": self.pue_source,
                "components": list(self.components), "started_at": self.started_at,
                "n_readings": len(self._t), "n_marks": len(self._marks), "errors": list(self.errors),
                "meters": [m.info() for m in self.meters]}
