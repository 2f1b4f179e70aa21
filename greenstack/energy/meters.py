"""Energy meters: one interface over hardware counters (NVML, RAPL) and the TDP/RSS estimates.

Every meter reports CUMULATIVE joules per component ("cpu", "gpu", "ram") since its `start()`, so a
missed sample loses time resolution but never energy. Each meter carries a provenance label and a
source string, so the report can say exactly where a number came from and how much to trust it.

`select_meters` picks the best available meters and explains, in one line each, why the others were
not used (this is what `greenstack doctor` prints).

Scope: NVML and RAPL read node-wide counters (`scope == "node"`): in a distributed run only one
process per node may read them, otherwise the node's energy is counted once per rank (see
`greenstack.energy.monitor.should_meter`). The TDP and RSS models are process-tree scoped
(`scope == "process"`); `select_meters` points them at the node's process tree root
(`node_process_root_pid`) so that one process per node also covers every local rank.
"""

from __future__ import annotations

import abc
import os
from typing import Any

from greenstack.errors import ConfigError, Problem
from greenstack.provenance import Provenance

COMPONENTS: tuple[str, ...] = ("cpu", "gpu", "ram")
METER_KINDS: tuple[str, ...] = ("auto", "nvml", "rapl", "tdp")

# 3 W per 8 GB of DDR3/DDR4 = 0.375 W/GB: the RAM heuristic of codecarbon before v3
# (codecarbon/external/ram.py, citing Crucial's "How much power does memory use?"). Coarse, but
# RAM is usually a few percent of a training run's energy.
DEFAULT_RAM_W_PER_GB = 0.375
DEFAULT_TDP_W = 85.0


class MeterUnavailable(Exception):
    """A meter cannot run on this machine; the message is a one-line human reason, prefixed by the meter."""


class Meter(abc.ABC):
    """Base class of all energy meters.

    Subclasses set `name`, `provenance`, `source`, `components` and `scope`, and implement
    `read_energy_j`. Meters are not thread-safe on their own: `EnergyMonitor` serialises all calls.
    """

    name: str = ""
    provenance: Provenance = "estimated"
    source: str = ""
    components: tuple[str, ...] = ()
    scope: str = "node"  # "node": node-wide counter; "process": this process tree only

    def start(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Reset the cumulative energy to zero at the current instant."""

    @abc.abstractmethod
    def read_energy_j(self) -> dict[str, float]:
        """Cumulative joules per component since `start()` (keys = `components`)."""

    def poll(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Hook for meters that integrate power samples; the monitor thread calls it every interval."""

    def stop(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Take a last sample and release resources; `read_energy_j` still returns the final totals."""

    def info(self) -> dict[str, Any]:
        """Extra details for reports and `greenstack doctor` (device names, matched table entry...)."""
        return {"name": self.name, "provenance": self.provenance, "source": self.source,
                "components": list(self.components), "scope": self.scope}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source} ({self.provenance})>"


def node_process_root_pid() -> int:
    """The pid whose process tree holds all training processes of this node.

    Under torchrun (TORCHELASTIC_RUN_ID set) every local worker is a child of the elastic agent, so
    metering the agent's tree from local rank 0 covers all ranks of the node; otherwise this process.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return os.getppid()
    return os.getpid()


def _check_kwargs(kind: str, tdp_w: float | None, default_tdp_w: float, ram_w_per_gb: float) -> None:
    problems: list[Problem] = []
    if kind not in METER_KINDS:
        problems.append(Problem("energy.meter", kind, "unknown meter kind", f"use one of {', '.join(METER_KINDS)}"))
    if tdp_w is not None and not tdp_w > 0:
        problems.append(Problem("energy.tdp_w", tdp_w, "must be a positive number of watts",
                                "omit it to look the CPU up in the shipped TDP table"))
    if not default_tdp_w > 0:
        problems.append(Problem("energy.default_tdp_w", default_tdp_w, "must be a positive number of watts"))
    if not ram_w_per_gb >= 0:
        problems.append(Problem("energy.ram_w_per_gb", ram_w_per_gb, "must be >= 0"))
    if problems:
        raise ConfigError(problems)


def select_meters(kind: str = "auto", *, tdp_w: float | None = None, default_tdp_w: float = DEFAULT_TDP_W,
                  ram_w_per_gb: float = DEFAULT_RAM_W_PER_GB, rapl_root: str = "/sys/class/powercap",
                  pid: int | None = None, nvml: Any = None,
                  cpuinfo_path: str = "/proc/cpuinfo") -> tuple[list[Meter], list[str]]:
    """Choose the meters for this machine; return them and one-line reasons for everything not used.

    auto: NVML for GPUs if available; RAPL for CPU (and DRAM) if readable, else the TDP x utilisation
    model for CPU; RAM from the RAPL dram domain if present, else `ram_w_per_gb` x RSS.
    Forcing "nvml", "rapl" or "tdp" makes that meter mandatory (ConfigError with the reason if it is
    unavailable) and the only one used for its components; the other components are filled as in auto.
    `nvml` (a pynvml-like module) and `cpuinfo_path` are injectable for tests.
    """
    from greenstack.energy.nvml import NvmlMeter
    from greenstack.energy.rapl import RaplMeter
    from greenstack.energy.tdp import RamRssMeter, TdpMeter

    _check_kwargs(kind, tdp_w, default_tdp_w, ram_w_per_gb)
    pid = node_process_root_pid() if pid is None else pid
    meters: list[Meter] = []
    reasons: list[str] = []

    def forced_unavailable(exc: MeterUnavailable) -> ConfigError:
        return ConfigError(Problem("energy.meter", kind, f"forced meter is unavailable: {exc}",
                                   "use energy.meter=auto to fall back to what this machine supports"))

    # GPU
    try:
        meters.append(NvmlMeter(nvml=nvml))
    except MeterUnavailable as exc:
        if kind == "nvml":
            raise forced_unavailable(exc) from exc
        reasons.append(str(exc))

    # CPU (+ DRAM)
    rapl: RaplMeter | None = None
    if kind == "tdp":
        reasons.append("rapl: not used (energy.meter=tdp forces the TDP model)")
    else:
        try:
            rapl = RaplMeter(root=rapl_root)
            meters.append(rapl)
        except MeterUnavailable as exc:
            if kind == "rapl":
                raise forced_unavailable(exc) from exc
            reasons.append(str(exc))
    if rapl is None:
        meters.append(TdpMeter(tdp_w=tdp_w, default_tdp_w=default_tdp_w, pid=pid, cpuinfo_path=cpuinfo_path))
    else:
        reasons.append("tdp: not used (RAPL measures the CPU)")

    # RAM
    if rapl is not None and "ram" in rapl.components:
        reasons.append("ram: RSS estimate not used (RAPL dram domain measures RAM)")
    else:
        if rapl is not None:
            reasons.append("rapl: no dram domain, RAM is estimated from RSS")
        meters.append(RamRssMeter(w_per_gb=ram_w_per_gb, pid=pid))
    return meters, reasons
