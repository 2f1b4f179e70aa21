"""Estimated CPU and RAM energy where no counter is readable (VMs, containers, CPUs without RAPL).

CPU: power = TDP x process-tree CPU utilisation, where utilisation = Δ(user+system CPU seconds of the
process and all its descendants) / (Δwall x logical CPUs). TDP comes from the shipped codecarbon table
(data/cpu_power.csv, MIT, see data/LICENSE-cpu_power.md), matched on the /proc/cpuinfo model name; a
configured `tdp_w` overrides it; an unknown CPU uses `default_tdp_w`, labelled "fallback" (never a
silent zero). TDP is a design limit, not a measurement, and in a VM the guest sees only its vCPUs of a
larger package, so this model is coarse: it is labelled "estimated".

RAM: power = w_per_gb x resident set size of the process tree (shared pages of forked workers are
counted once per process, so this leans high).
"""

from __future__ import annotations

import csv
import difflib
import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from greenstack.energy.meters import DEFAULT_RAM_W_PER_GB, DEFAULT_TDP_W, Meter

FUZZY_CUTOFF = 0.85
_BYTES_PER_GB = 1024**3

_NOISE = [
    (re.compile(r"\((?:r|tm|c)\)|®|™", re.I), " "),
    (re.compile(r"@\s*[\d.]+\s*[gm]hz", re.I), " "),
    (re.compile(r"\b[\d.]+\s*[gm]hz\b", re.I), " "),
    (re.compile(r"\b\d+(?:st|nd|rd|th)\s+gen(?:eration)?\b", re.I), " "),
    (re.compile(r"\b(?:\d+|single|dual|triple|quad|six|eight|ten|twelve|sixteen)[- ]cores?\b", re.I), " "),
    (re.compile(r"\b(?:with|w/)\s+radeon\b.*$", re.I), " "),
    (re.compile(r"\b(?:cpu|processor|apu)\b", re.I), " "),
]


def normalize_cpu_name(name: str) -> str:
    """Lower-case model name without trademarks, clock speed, core count and filler words."""
    text = name
    for pattern, repl in _NOISE:
        text = pattern.sub(repl, text)
    return re.sub(r"\s+", " ", text).strip().lower()


def _digit_parts(normalized: str) -> frozenset[str]:
    """Model-number parts ("i7", "8700k", "v4"): a match must agree on all of them."""
    return frozenset(p for p in re.split(r"[\s\-_/]+", normalized) if any(c.isdigit() for c in p))


def _vendor(normalized: str) -> str | None:
    first = normalized.split(" ", 1)[0]
    return first if first in ("intel", "amd") else None


def _is_subsequence(needle: list[str], haystack: list[str]) -> bool:
    it = iter(haystack)
    return all(tok in it for tok in needle)


@dataclass(frozen=True)
class CpuMatch:
    """Result of looking a CPU model name up in the TDP table."""

    model: str
    normalized: str
    entry: str | None  # table name that matched, None if unknown
    tdp_w: float | None
    method: str | None  # "exact" | "contained" | "fuzzy" | None


@functools.lru_cache(maxsize=4)
def load_cpu_power_table(path: str | None = None) -> dict[str, tuple[str, float]]:
    """Normalised name -> (table name, TDP W) from the shipped cpu_power.csv (or `path`)."""
    if path is None:
        text = resources.files("greenstack.energy").joinpath("data/cpu_power.csv").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    table: dict[str, tuple[str, float]] = {}
    for row in csv.DictReader(text.splitlines()):
        try:
            name, tdp = row["Name"].strip(), float(row["TDP"])
        except (KeyError, TypeError, ValueError):
            continue
        if name and tdp > 0:
            table.setdefault(normalize_cpu_name(name), (name, tdp))
    return table


def match_cpu_tdp(model: str, table: dict[str, tuple[str, float]] | None = None) -> CpuMatch:
    """Find the TDP of a CPU model: exact, then longest contained table name, then close fuzzy match.

    Conservative on purpose: a candidate must agree on every model-number part (so "E5-2680 v4" never
    takes the v1 TDP, "EPYC 7B13" never takes "7B12") and on the vendor; a bare "Intel Xeon" matches
    nothing and falls back to the configured default.
    """
    table = load_cpu_power_table() if table is None else table
    norm = normalize_cpu_name(model)
    digits = _digit_parts(norm)
    if norm in table:
        name, tdp = table[norm]
        return CpuMatch(model, norm, name, tdp, "exact")
    if not digits:
        return CpuMatch(model, norm, None, None, None)
    vendor, tokens = _vendor(norm), norm.split(" ")
    best: str | None = None
    for cand in table:
        cvendor = _vendor(cand)
        if cvendor is None or (vendor is not None and cvendor != vendor):
            continue
        if _digit_parts(cand) == digits and _is_subsequence(cand.split(" "), tokens) and (
                best is None or len(cand) > len(best)):
            best = cand
    if best is not None:
        name, tdp = table[best]
        return CpuMatch(model, norm, name, tdp, "contained")
    for cand in difflib.get_close_matches(norm, list(table), n=10, cutoff=FUZZY_CUTOFF):
        if _digit_parts(cand) == digits and _vendor(cand) == vendor:
            name, tdp = table[cand]
            return CpuMatch(model, norm, name, tdp, "fuzzy")
    return CpuMatch(model, norm, None, None, None)


def read_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str, int]:
    """CPU model name and number of sockets (distinct "physical id") from /proc/cpuinfo."""
    model, sockets = "", set()
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "unknown CPU", 1
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key == "model name" and not model:
            model = value
        elif key == "physical id":
            sockets.add(value)
    return model or "unknown CPU", max(len(sockets), 1)


def _process(pid: int | None) -> Any:
    import psutil

    return psutil.Process(os.getpid() if pid is None else pid)


class ProcessTree:
    """A process and its descendants, the descendant list re-enumerated at most every `refresh_s`.

    Why: psutil finds children by reading /proc/<pid>/stat of *every* process on the machine (a few ms
    with ~100 processes), and the meters are read at logging steps inside the training loop. A cached
    child that has exited is skipped; once reaped its time is in the parent's children_user/system, so
    the CPU total stays continuous. A new child (e.g. a DataLoader worker) is seen at the next refresh,
    with all its CPU time so far: energy is never lost, only attributed up to `refresh_s` later.
    """

    def __init__(self, pid: int | None = None, *, refresh_s: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = _process(pid)
        self.refresh_s = float(refresh_s)
        self._clock = clock
        self._children: list[Any] = []
        self._listed_at: float | None = None

    def processes(self) -> list[Any]:
        """[root, *descendants] (descendants as of the last refresh)."""
        import psutil

        now = self._clock()
        if self._listed_at is None or now - self._listed_at >= self.refresh_s:
            try:
                self._children = self.root.children(recursive=True)
            except psutil.Error:
                self._children = []
            self._listed_at = now
        return [self.root, *self._children]


def process_tree_cpu_seconds(pid: int | None = None, *, tree: ProcessTree | None = None) -> float:
    """User+system CPU seconds of a process and all its descendants, including reaped children.

    Reaped children's time moves into their parent's children_user/system, so the sum stays continuous
    as DataLoader workers and subprocesses come and go.
    """
    import psutil

    total = 0.0
    for proc in (tree or ProcessTree(pid, refresh_s=0.0)).processes():
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + getattr(t, "children_user", 0.0) + getattr(t, "children_system", 0.0)
    return total


def process_tree_rss_bytes(pid: int | None = None, *, tree: ProcessTree | None = None) -> int:
    """Resident memory of a process and all its descendants (shared pages counted per process)."""
    import psutil

    total = 0
    for proc in (tree or ProcessTree(pid, refresh_s=0.0)).processes():
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def _logical_cpus() -> int:
    import psutil

    return psutil.cpu_count(logical=True) or os.cpu_count() or 1


class TdpMeter(Meter):
    """Estimated CPU energy = TDP x process-tree CPU utilisation, integrated over `poll()` calls."""

    name = "tdp"
    components = ("cpu",)
    scope = "process"

    def __init__(self, *, tdp_w: float | None = None, default_tdp_w: float = DEFAULT_TDP_W, pid: int | None = None,
                 cpu_model: str | None = None, cpuinfo_path: str = "/proc/cpuinfo", sockets: int | None = None,
                 logical_cpus: int | None = None, table: dict[str, tuple[str, float]] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 cpu_seconds_fn: Callable[[], float] | None = None) -> None:
        """`tdp_w` and the table are per socket; the modelled package power is TDP x sockets."""
        info_model, info_sockets = read_cpuinfo(cpuinfo_path)
        self.cpu_model = cpu_model if cpu_model is not None else info_model
        self.sockets = sockets if sockets is not None else info_sockets
        self.logical_cpus = logical_cpus if logical_cpus is not None else _logical_cpus()
        self.pid = os.getpid() if pid is None else pid
        self.match = match_cpu_tdp(self.cpu_model, table)
        mult = f"{self.sockets}×" if self.sockets > 1 else ""
        if tdp_w is not None:
            self.tdp_w, self.provenance = float(tdp_w), "estimated"
            self.source = f"tdp:configured {mult}{self.tdp_w:g} W ({self.cpu_model})×cpu_util"
        elif self.match.tdp_w is not None:
            self.tdp_w, self.provenance = self.match.tdp_w, "estimated"
            self.source = f"tdp:{self.match.entry} ({mult}{self.tdp_w:g} W)×cpu_util"
        else:
            self.tdp_w, self.provenance = float(default_tdp_w), "fallback"
            self.source = f"tdp:unknown CPU '{self.cpu_model}': default {mult}{self.tdp_w:g} W×cpu_util"
        self.power_cap_w = self.tdp_w * self.sockets
        self._clock = clock
        self._cpu_seconds = cpu_seconds_fn or functools.partial(process_tree_cpu_seconds, tree=ProcessTree(self.pid))
        self._last_t: float | None = None
        self._last_cpu_s = 0.0
        self.energy_j = 0.0
        self.last_cpu_util: float | None = None

    def start(self) -> None:
        t_before = self._clock()
        self._last_cpu_s = self._cpu_seconds()
        self._last_t = (t_before + self._clock()) / 2.0
        self.energy_j = 0.0

    def poll(self) -> None:
        """Add TDP x mean utilisation since the previous poll (exact average: CPU-seconds / wall-seconds)."""
        if self._last_t is None:
            self.start()
            return
        t_before = self._clock()
        cpu_s = self._cpu_seconds()  # walking the process tree can take a while under GIL contention
        t = (t_before + self._clock()) / 2.0
        dt = t - self._last_t
        if dt <= 0:
            return
        busy_s = max(cpu_s - self._last_cpu_s, 0.0)
        # TDP x util x dt == TDP x busy_s / logical_cpus: no clamp, so read-time skew between polls cancels out
        self.energy_j += self.power_cap_w * busy_s / self.logical_cpus
        self.last_cpu_util = min(busy_s / (dt * self.logical_cpus), 1.0)
        self._last_t, self._last_cpu_s = t, cpu_s

    def read_energy_j(self) -> dict[str, float]:
        """Energy up to the last `poll()` (the monitor polls right before reading)."""
        return {"cpu": self.energy_j}

    def stop(self) -> None:
        self.poll()

    def info(self) -> dict[str, Any]:
        details = super().info()
        details.update(cpu_model=self.cpu_model, matched_entry=self.match.entry, match_method=self.match.method,
                       tdp_w=self.tdp_w, sockets=self.sockets, logical_cpus=self.logical_cpus, pid=self.pid,
                       cpu_util=self.last_cpu_util)
        return details


class RamRssMeter(Meter):
    """Estimated RAM energy = w_per_gb x RSS of the process tree, trapezoid-integrated over polls."""

    name = "ram"
    provenance = "estimated"
    components = ("ram",)
    scope = "process"

    def __init__(self, *, w_per_gb: float = DEFAULT_RAM_W_PER_GB, pid: int | None = None,
                 clock: Callable[[], float] = time.monotonic, rss_bytes_fn: Callable[[], int] | None = None) -> None:
        self.w_per_gb = float(w_per_gb)
        self.pid = os.getpid() if pid is None else pid
        self.source = f"ram:{self.w_per_gb:g} W/GB×RSS"
        self._clock = clock
        self._rss = rss_bytes_fn or functools.partial(process_tree_rss_bytes, tree=ProcessTree(self.pid))
        self._last_t: float | None = None
        self._last_power_w = 0.0
        self.energy_j = 0.0
        self.peak_rss_bytes = 0

    def _power_w(self) -> float:
        rss = self._rss()
        self.peak_rss_bytes = max(self.peak_rss_bytes, rss)
        return self.w_per_gb * rss / _BYTES_PER_GB

    def start(self) -> None:
        t_before = self._clock()
        self._last_power_w = self._power_w()
        self._last_t = (t_before + self._clock()) / 2.0
        self.energy_j = 0.0

    def poll(self) -> None:
        if self._last_t is None:
            self.start()
            return
        t_before = self._clock()
        power_w = self._power_w()
        t = (t_before + self._clock()) / 2.0
        self.energy_j += (self._last_power_w + power_w) / 2.0 * max(t - self._last_t, 0.0)
        self._last_t, self._last_power_w = t, power_w

    def read_energy_j(self) -> dict[str, float]:
        """Energy up to the last `poll()`."""
        return {"ram": self.energy_j}

    def stop(self) -> None:
        self.poll()

    def info(self) -> dict[str, Any]:
        details = super().info()
        details.update(w_per_gb=self.w_per_gb, pid=self.pid, peak_rss_gb=self.peak_rss_bytes / _BYTES_PER_GB)
        return details
