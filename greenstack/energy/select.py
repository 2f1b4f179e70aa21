"""`select_meters`: the best energy meters this machine offers, and one line for each one not used.

It sits above the meter modules (meters <- nvml/rapl/tdp <- select), so no meter imports it back.
"""

from __future__ import annotations

from typing import Any

from greenstack.energy.meters import (
    DEFAULT_RAM_W_PER_GB,
    DEFAULT_TDP_W,
    METER_KINDS,
    Meter,
    MeterUnavailable,
    node_process_root_pid,
)
from greenstack.energy.nvml import NvmlMeter
from greenstack.energy.rapl import RaplMeter
from greenstack.energy.tdp import RamRssMeter, TdpMeter
from greenstack.errors import ConfigError, Problem


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
