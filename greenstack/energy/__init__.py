"""Energy measurement: hardware counters (NVML, RAPL) where available, labelled estimates otherwise.

Typical use (one process per node)::

    meters, reasons = select_meters("auto")
    if should_meter():
        with EnergyMonitor(meters, interval_s=1.0) as monitor:
            train()          # optionally monitor.sample() at step/epoch boundaries
        monitor.intervals(); monitor.figures()
"""

from greenstack.energy.meters import (
    COMPONENTS,
    DEFAULT_RAM_W_PER_GB,
    DEFAULT_TDP_W,
    METER_KINDS,
    Meter,
    MeterUnavailable,
    node_process_root_pid,
)
from greenstack.energy.monitor import EnergyInterval, EnergyMonitor, should_meter
from greenstack.energy.nvml import NvmlMeter, resolve_visible_devices
from greenstack.energy.rapl import RaplMeter
from greenstack.energy.select import select_meters
from greenstack.energy.tdp import CpuMatch, RamRssMeter, TdpMeter, load_cpu_power_table, match_cpu_tdp

__all__ = [
    "COMPONENTS",
    "DEFAULT_RAM_W_PER_GB",
    "DEFAULT_TDP_W",
    "METER_KINDS",
    "CpuMatch",
    "EnergyInterval",
    "EnergyMonitor",
    "Meter",
    "MeterUnavailable",
    "NvmlMeter",
    "RamRssMeter",
    "RaplMeter",
    "TdpMeter",
    "load_cpu_power_table",
    "match_cpu_tdp",
    "node_process_root_pid",
    "resolve_visible_devices",
    "select_meters",
    "should_meter",
]
