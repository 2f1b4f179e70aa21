"""GPU energy from NVIDIA's NVML (package nvidia-ml-py, imported lazily so CPU-only installs work).

Preferred: the cumulative energy counter `nvmlDeviceGetTotalEnergyConsumption` (mJ since driver load,
Volta and newer) -> source "nvml.total_energy". Otherwise `nvmlDeviceGetPowerUsage` (mW) sampled by
`poll()` and integrated with the trapezoid rule -> source "nvml.power_poll" (both "measured").

Only GPUs visible to this process (CUDA_VISIBLE_DEVICES: indices, GPU-UUID prefixes, MIG UUIDs) are
metered. Indices are NVML (PCI bus) order, which is CUDA's order when CUDA_DEVICE_ORDER=PCI_BUS_ID or
the GPUs are identical (the usual training node). A GPU in MIG mode is metered whole: NVML has no
per-slice energy, so the figure is labelled "whole-GPU energy, MIG slice not attributable".
The counters are node-wide: only one process per node (local rank 0) should meter, and it must see
every GPU of the node (do not restrict its CUDA_VISIBLE_DEVICES to one GPU, or pass
`respect_cuda_visible_devices=False`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from greenstack.energy.meters import Meter, MeterUnavailable

MIG_NOTE = "whole-GPU energy, MIG slice not attributable"


class _Never(Exception):
    """Stand-in for an NVML error class a (fake) module does not define: matches nothing."""


def _err(nvml: Any, name: str) -> type[BaseException]:
    return getattr(nvml, name, _Never)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class GpuDevice:
    """State of one metered GPU."""

    index: int
    handle: Any
    name: str
    uuid: str
    method: str  # "total_energy" | "power_poll"
    mig: bool = False
    last_counter_mj: int = 0
    accumulated_mj: float = 0.0
    last_power_w: float | None = None
    last_t: float | None = None
    energy_j: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"GPU{self.index}"


def resolve_visible_devices(value: str | None, uuids: list[str],
                            mig_parents: dict[str, int] | None = None) -> list[int]:
    """NVML indices selected by a CUDA_VISIBLE_DEVICES value, with CUDA's rules.

    None (unset) = all GPUs; entries are indices, "GPU-<uuid prefix>" or "MIG-..." UUIDs (mapped to
    the parent GPU); like CUDA, the list ends at the first invalid entry.
    """
    if value is None:
        return list(range(len(uuids)))
    mig_parents = {k.lower(): v for k, v in (mig_parents or {}).items()}
    lowered = [u.lower() for u in uuids]
    chosen: list[int] = []
    for raw in value.split(","):
        entry = raw.strip().lower()
        index: int | None = None
        if entry.isdigit():
            index = int(entry) if int(entry) < len(uuids) else None
        elif entry.startswith("gpu-"):
            hits = [i for i, u in enumerate(lowered) if u.startswith(entry)]
            index = hits[0] if len(hits) == 1 else None
        elif entry.startswith("mig-"):
            index = mig_parents.get(entry)
            if index is None and entry.startswith("mig-gpu-"):  # legacy MIG-GPU-<uuid>/<gi>/<ci>
                parent = entry[len("mig-"):].split("/")[0]
                hits = [i for i, u in enumerate(lowered) if u == parent]
                index = hits[0] if len(hits) == 1 else None
        if index is None:
            break
        if index not in chosen:
            chosen.append(index)
    return chosen


class NvmlMeter(Meter):
    """Measured GPU energy of the visible NVIDIA GPUs (component "gpu")."""

    name = "nvml"
    provenance = "measured"
    components = ("gpu",)
    scope = "node"

    def __init__(self, nvml: Any = None, *, clock: Callable[[], float] = time.monotonic,
                 cuda_visible_devices: str | None = None, respect_cuda_visible_devices: bool = True) -> None:
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as exc:
                raise MeterUnavailable("nvml: pynvml not installed (pip install nvidia-ml-py)") from exc
        self._nvml = nvml
        self._clock = clock
        self._error = _err(nvml, "NVMLError")
        self._init()
        count = self._call(nvml.nvmlDeviceGetCount, what="nvmlDeviceGetCount")
        if count == 0:
            raise MeterUnavailable("nvml: no NVIDIA GPU found")
        try:
            handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            uuids = [_text(nvml.nvmlDeviceGetUUID(h)) for h in handles]
        except self._error as exc:
            raise MeterUnavailable(f"nvml: cannot enumerate the {count} GPU(s): {exc}") from exc
        migs = [self._mig_enabled(h) for h in handles]
        visible = None
        if respect_cuda_visible_devices:
            visible = cuda_visible_devices if cuda_visible_devices is not None else os.environ.get(
                "CUDA_VISIBLE_DEVICES")
        mig_parents = self._mig_parents(handles, migs) if visible and "mig-" in visible.lower() else {}
        indices = resolve_visible_devices(visible, uuids, mig_parents)
        if not indices:
            raise MeterUnavailable(f"nvml: CUDA_VISIBLE_DEVICES={visible!r} hides all {count} GPU(s)")
        self.devices: list[GpuDevice] = []
        self.unmetered: list[str] = []
        for i in indices:
            handle = handles[i]
            try:
                name = _text(nvml.nvmlDeviceGetName(handle))
            except self._error:
                name = "unknown NVIDIA GPU"
            method = self._energy_method(handle)
            if method is None:
                self.unmetered.append(f"GPU{i} {name}: neither energy counter nor power reading supported")
                continue
            dev = GpuDevice(i, handle, name, uuids[i], method, mig=migs[i])
            if dev.mig:
                dev.notes.append(MIG_NOTE)
            self.devices.append(dev)
        if not self.devices:
            raise MeterUnavailable("nvml: no visible GPU supports energy or power readings ("
                                   + "; ".join(self.unmetered) + ")")
        self.source = self._build_source()

    # --- setup helpers ---
    def _init(self) -> None:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except _err(nvml, "NVMLError_LibraryNotFound") as exc:
            raise MeterUnavailable("nvml: library not found (libnvidia-ml: no NVIDIA driver installed)") from exc
        except _err(nvml, "NVMLError_DriverNotLoaded") as exc:
            raise MeterUnavailable("nvml: NVIDIA driver not loaded") from exc
        except _err(nvml, "NVMLError_NoPermission") as exc:
            raise MeterUnavailable("nvml: no permission to talk to the NVIDIA driver") from exc
        except self._error as exc:
            raise MeterUnavailable(f"nvml: initialisation failed: {exc}") from exc

    def _call(self, fn: Callable[..., Any], *args: Any, what: str) -> Any:
        try:
            return fn(*args)
        except self._error as exc:
            raise MeterUnavailable(f"nvml: {what} failed: {exc}") from exc

    def _mig_enabled(self, handle: Any) -> bool:
        try:
            current, _pending = self._nvml.nvmlDeviceGetMigMode(handle)
        except (self._error, AttributeError):
            return False  # pre-Ampere GPUs: MIG not supported
        return current == 1

    def _mig_parents(self, handles: list[Any], migs: list[bool]) -> dict[str, int]:
        """MIG device UUID -> parent GPU index, for CUDA_VISIBLE_DEVICES=MIG-<uuid>."""
        nvml, parents = self._nvml, {}
        for i, (handle, mig) in enumerate(zip(handles, migs, strict=True)):
            if not mig:
                continue
            try:
                n = nvml.nvmlDeviceGetMaxMigDeviceCount(handle)
            except (self._error, AttributeError):
                continue
            for j in range(n):
                try:
                    parents[_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, j)))] = i
                except (self._error, AttributeError):
                    continue
        return parents

    def _energy_method(self, handle: Any) -> str | None:
        try:
            self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return "total_energy"
        except (self._error, AttributeError):
            pass
        try:
            self._nvml.nvmlDeviceGetPowerUsage(handle)
            return "power_poll"
        except (self._error, AttributeError):
            return None

    def _build_source(self) -> str:
        parts = []
        for method in ("total_energy", "power_poll"):
            devs = [d for d in self.devices if d.method == method]
            if devs:
                part = f"nvml.{method}:" + "+".join(d.label for d in devs)
                if any(d.mig for d in devs):
                    part += f" ({MIG_NOTE})"
                parts.append(part)
        return "; ".join(parts)

    # --- Meter API ---
    def start(self) -> None:
        t = self._clock()
        for dev in self.devices:
            dev.accumulated_mj = 0.0
            dev.energy_j = 0.0
            if dev.method == "total_energy":
                dev.last_counter_mj = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(dev.handle))
            else:
                dev.last_power_w = self._nvml.nvmlDeviceGetPowerUsage(dev.handle) / 1000.0
                dev.last_t = t

    def poll(self) -> None:
        """Sample power of the devices without an energy counter and integrate (trapezoid rule)."""
        t = self._clock()
        for dev in self.devices:
            if dev.method != "power_poll":
                continue
            try:
                power_w = self._nvml.nvmlDeviceGetPowerUsage(dev.handle) / 1000.0
            except self._error:
                continue  # the next good sample bridges the gap
            if dev.last_power_w is not None and dev.last_t is not None:
                dev.energy_j += (dev.last_power_w + power_w) / 2.0 * max(t - dev.last_t, 0.0)
            dev.last_power_w, dev.last_t = power_w, t

    def read_energy_by_device_j(self) -> dict[str, float]:
        """Cumulative joules per GPU ("GPU0", ...) since start(); power-polled GPUs up to the last poll()."""
        out: dict[str, float] = {}
        for dev in self.devices:
            if dev.method == "total_energy":
                raw = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(dev.handle))
                # The counter only resets when the driver reloads: then count from zero again.
                dev.accumulated_mj += raw - dev.last_counter_mj if raw >= dev.last_counter_mj else raw
                dev.last_counter_mj = raw
                dev.energy_j = dev.accumulated_mj / 1000.0
            out[dev.label] = dev.energy_j
        return out

    def read_energy_j(self) -> dict[str, float]:
        return {"gpu": sum(self.read_energy_by_device_j().values())}

    def stop(self) -> None:
        self.poll()
        self.read_energy_by_device_j()

    def utilization(self) -> dict[str, Any]:
        """Mean GPU utilisation (%) and memory used fraction over visible GPUs (None where unsupported)."""
        per_device, utils, used, total = [], [], 0, 0
        for dev in self.devices:
            row: dict[str, Any] = {"gpu": dev.label, "gpu_util_percent": None, "memory_used_fraction": None}
            try:
                util = float(self._nvml.nvmlDeviceGetUtilizationRates(dev.handle).gpu)
                row["gpu_util_percent"] = util
                utils.append(util)
            except self._error:  # not supported on MIG-enabled GPUs
                pass
            try:
                mem = self._nvml.nvmlDeviceGetMemoryInfo(dev.handle)
                row["memory_used_fraction"] = mem.used / mem.total if mem.total else None
                used, total = used + mem.used, total + mem.total
            except self._error:
                pass
            per_device.append(row)
        return {"gpu_util_percent": sum(utils) / len(utils) if utils else None,
                "memory_used_fraction": used / total if total else None,
                "devices": per_device}

    def info(self) -> dict[str, Any]:
        details = super().info()
        details["devices"] = [{"index": d.index, "name": d.name, "uuid": d.uuid, "method": d.method,
                               "mig_mode": d.mig, "notes": list(d.notes)} for d in self.devices]
        details["unmetered"] = list(self.unmetered)
        if any(d.mig for d in self.devices):
            details["mig"] = MIG_NOTE
        details["utilization"] = self.utilization()
        return details
