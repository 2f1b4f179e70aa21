"""Zeus-style GPU power-limit search (You, Chung & Chowdhury, NSDI '23), against pynvml.

Lower power limits make each step slower but often cheaper in energy. During the first steps of
training, the sweep runs a few steps at every candidate limit (maximum down to minimum in `step_w`
steps), measures time and energy per step from NVML's energy counter, and keeps the limit with the
lowest Zeus cost per step, `eta * E + (1 - eta) * P_max * T`: `eta=1` minimises energy only, `eta=0`
time only. The original limit is always restored at the end of the run (the limit is node-global
state that outlives the process). Setting limits needs root or `nvidia-smi -pm 1` + permissions; when
NVML refuses, the search turns itself off and says so.

The NVML module is injectable (`nvml=`), as in greenstack.energy.nvml, so it is tested with a fake.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from greenstack.energy.nvml import resolve_visible_devices


class PowerLimitUnavailable(Exception):
    """NVML, the GPU or the permissions do not allow power-limit control; the message says which."""


def _nvml_error(nvml: Any) -> type[BaseException]:
    return getattr(nvml, "NVMLError", RuntimeError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def nvml_device_handle(nvml: Any, cuda_index: int = 0, cuda_visible_devices: str | None = None) -> tuple[Any, int]:
    """(handle, NVML index) of CUDA device `cuda_index`, honouring CUDA_VISIBLE_DEVICES."""
    visible = cuda_visible_devices if cuda_visible_devices is not None else os.environ.get("CUDA_VISIBLE_DEVICES")
    count = nvml.nvmlDeviceGetCount()
    uuids = [_text(nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)]
    indices = resolve_visible_devices(visible, uuids)
    if cuda_index >= len(indices):
        raise PowerLimitUnavailable(f"CUDA device {cuda_index} is not among the {len(indices)} visible GPUs")
    return nvml.nvmlDeviceGetHandleByIndex(indices[cuda_index]), indices[cuda_index]


def load_nvml(nvml: Any = None) -> Any:
    """The given NVML module, or pynvml initialised; raises PowerLimitUnavailable."""
    if nvml is None:
        try:
            import pynvml as nvml
        except ImportError as e:
            raise PowerLimitUnavailable("pynvml not installed (pip install nvidia-ml-py)") from e
    try:
        nvml.nvmlInit()
    except _nvml_error(nvml) as e:
        raise PowerLimitUnavailable(f"NVML unavailable: {e}") from e
    return nvml


class GpuPowerControl:
    """Read and set one GPU's power limit (watts) and read its energy counter (joules)."""

    def __init__(self, nvml: Any = None, cuda_index: int = 0, *, cuda_visible_devices: str | None = None) -> None:
        self.nvml = load_nvml(nvml)
        self._error = _nvml_error(self.nvml)
        try:
            self.handle, self.index = nvml_device_handle(self.nvml, cuda_index, cuda_visible_devices)
            lo, hi = self.nvml.nvmlDeviceGetPowerManagementLimitConstraints(self.handle)
            self.original_w = self.nvml.nvmlDeviceGetPowerManagementLimit(self.handle) / 1000
            self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except self._error as e:
            raise PowerLimitUnavailable(f"GPU{cuda_index}: power limits or energy counter not readable: {e}") from e
        self.min_w, self.max_w = lo / 1000, hi / 1000

    def limit_w(self) -> float:
        return self.nvml.nvmlDeviceGetPowerManagementLimit(self.handle) / 1000

    def set_limit_w(self, watts: float) -> None:
        try:
            self.nvml.nvmlDeviceSetPowerManagementLimit(self.handle, int(round(watts * 1000)))
        except self._error as e:
            raise PowerLimitUnavailable(f"NVML refused to set the power limit to {watts:g} W ({e}); "
                                        f"needs root or nvidia-smi permissions") from e

    def energy_j(self) -> float:
        return self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle) / 1000

    def restore(self) -> None:
        """Put the limit found at start back (best effort: never raises)."""
        try:
            self.set_limit_w(self.original_w)
        except PowerLimitUnavailable:
            pass


def candidate_limits(min_w: float, max_w: float, step_w: float) -> list[float]:
    """max, max - step, ... down to min (always included)."""
    limits, w = [], max_w
    while w > min_w + 1e-9:
        limits.append(round(w, 3))
        w -= step_w
    limits.append(round(min_w, 3))
    return limits


def zeus_cost(energy_j: float, time_s: float, *, eta: float, max_power_w: float) -> float:
    """Zeus's energy-time cost: eta * E + (1 - eta) * P_max * T (joules)."""
    return eta * energy_j + (1 - eta) * max_power_w * time_s


@dataclass
class LimitMeasurement:
    """Energy and time of `steps` training steps at one power limit."""

    limit_w: float
    energy_j: float
    time_s: float
    steps: int

    def cost_per_step(self, eta: float, max_power_w: float) -> float:
        return zeus_cost(self.energy_j, self.time_s, eta=eta, max_power_w=max_power_w) / max(self.steps, 1)

    def to_dict(self) -> dict[str, float]:
        return {"limit_w": self.limit_w, "energy_j": self.energy_j, "time_s": self.time_s, "steps": self.steps}


@dataclass
class PowerLimitSweep:
    """The sweep as a state machine driven by `on_step()` after each optimizer step.

    `begin()` sets the maximum limit for `warmup_steps`; then each candidate gets `settle_steps`
    unmeasured steps and `profile_steps` measured ones; then the cheapest limit is set and
    `on_step()` returns True once. `sync` waits for queued GPU work before a timestamp.
    """

    control: GpuPowerControl
    eta: float = 0.5
    step_w: float = 25.0
    warmup_steps: int = 5
    settle_steps: int = 2
    profile_steps: int = 10
    clock: Callable[[], float] = time.perf_counter
    sync: Callable[[], None] = lambda: None
    measurements: list[LimitMeasurement] = field(default_factory=list)
    chosen_w: float | None = None

    def __post_init__(self) -> None:
        self.limits = candidate_limits(self.control.min_w, self.control.max_w, self.step_w)
        self._i = -1
        self._count = 0
        self._phase = "idle"
        self._t0 = self._e0 = 0.0
        self.done = False

    @property
    def steps_needed(self) -> int:
        return self.warmup_steps + len(self.limits) * (self.settle_steps + self.profile_steps)

    def begin(self) -> None:
        self.control.set_limit_w(self.control.max_w)
        self._phase, self._count = "warmup", 0
        if self.warmup_steps == 0:
            self._next()

    def _mark(self) -> None:
        self.sync()
        self._t0, self._e0 = self.clock(), self.control.energy_j()
        self._phase, self._count = "profile", 0

    def _next(self) -> bool:
        """Start profiling the next limit, or set the best one when all are measured."""
        self._i += 1
        if self._i == len(self.limits):
            self.chosen_w = self.best().limit_w
            self.control.set_limit_w(self.chosen_w)
            self.done, self._phase = True, "done"
            return True
        self.control.set_limit_w(self.limits[self._i])
        self._phase, self._count = "settle", 0
        if self.settle_steps == 0:
            self._mark()
        return False

    def on_step(self) -> bool:
        """Advance by one finished step; True exactly once, when the chosen limit has been set."""
        if self.done or self._phase == "idle":
            return False
        self._count += 1
        if self._phase == "warmup" and self._count >= self.warmup_steps:
            return self._next()
        if self._phase == "settle" and self._count >= self.settle_steps:
            self._mark()
        elif self._phase == "profile" and self._count >= self.profile_steps:
            self.sync()
            self.measurements.append(LimitMeasurement(self.limits[self._i], self.control.energy_j() - self._e0,
                                                      self.clock() - self._t0, self.profile_steps))
            return self._next()
        return False

    def best(self) -> LimitMeasurement:
        return min(self.measurements, key=lambda m: m.cost_per_step(self.eta, self.control.max_w))
