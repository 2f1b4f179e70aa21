"""Zeus-style GPU power-limit search during the first training steps (opt-in; needs NVML permissions)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any

import torch

from greenstack.efficiency.power_limit import GpuPowerControl, PowerLimitSweep, PowerLimitUnavailable
from greenstack.efficiency.probe import synchronize
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import above, between, checked
from greenstack.policies.efficiency._common import (
    Count,
    EfficiencyPolicy,
    Enabled,
    Steps,
    config_key,
)
from greenstack.provenance import Figure


class PowerLimitSearch(EfficiencyPolicy):
    """Profiles every power limit on real training steps, keeps the cheapest by Zeus's cost, restores at the end.

    `eta` weighs energy against time (1: energy only). Turns itself off with the reason on machines
    without an NVIDIA GPU, without pynvml, or where NVML refuses to set limits (not root).
    """

    key = "power_limit"
    events = frozenset({Event.FIT_START, Event.STEP_END, Event.FIT_END, Event.EXCEPTION})

    @checked(config_key)
    def __init__(self, enabled: Enabled = True,
                 eta: Annotated[float, between(0, 1, fix="1 = energy only, 0 = time only")] = 0.5,
                 step_w: Annotated[float, above(0, fix="watts")] = 25.0, warmup_steps: Steps = 5,
                 settle_steps: Steps = 2, profile_steps: Count = 10, nvml: Any = None,
                 clock: Callable[[], float] | None = None) -> None:
        super().__init__(enabled, [])
        self.eta, self.step_w = float(eta), float(step_w)
        self.warmup_steps, self.settle_steps, self.profile_steps = warmup_steps, settle_steps, profile_steps
        self.nvml, self.clock = nvml, clock or time.perf_counter
        self.control: GpuPowerControl | None = None
        self.sweep: PowerLimitSweep | None = None

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.FIT_START:
            self._start(state, reporter)
        elif event is Event.STEP_END and self.sweep is not None and not self.sweep.done:
            if self.sweep.on_step():
                self._chosen(state, reporter)
        elif event in (Event.FIT_END, Event.EXCEPTION) and self.control is not None:
            self.control.restore()
            self.record_decision(reporter, self._entry(state, restored_limit_w=self.control.original_w))

    def _start(self, state: State, reporter: Reporter) -> None:
        if state.device.type != "cuda" and self.nvml is None:
            self.decide(state, reporter, False, f"no NVIDIA GPU to power-limit (device {state.device})")
            return
        try:
            index = state.device.index
            if index is None:
                index = torch.cuda.current_device() if state.device.type == "cuda" else 0
            self.control = GpuPowerControl(self.nvml, index)
            sweep = PowerLimitSweep(self.control, eta=self.eta, step_w=self.step_w, warmup_steps=self.warmup_steps,
                                    settle_steps=self.settle_steps, profile_steps=self.profile_steps,
                                    clock=self.clock, sync=lambda: synchronize(state.device))
            needed = sweep.steps_needed
            if state.max_steps - state.step < needed:
                self.control = None
                self.decide(state, reporter, False, f"the run has {state.max_steps - state.step} steps left; profiling "
                                          f"{len(sweep.limits)} limits needs {needed}")
                return
            sweep.begin()
        except PowerLimitUnavailable as e:
            self.control = None
            self.decide(state, reporter, False, str(e))
            return
        self.sweep = sweep
        self.record_decision(reporter, self._entry(state, sweeping=sweep.limits, original_limit_w=self.control.original_w))

    def _chosen(self, state: State, reporter: Reporter) -> None:
        sweep = self.sweep
        assert sweep is not None and sweep.chosen_w is not None
        top = next(m for m in sweep.measurements if m.limit_w == sweep.limits[0])
        best = sweep.best()
        energy_ratio = (top.energy_j / top.steps) / (best.energy_j / best.steps) if best.energy_j > 0 else 1.0
        time_ratio = (best.time_s / best.steps) / (top.time_s / top.steps) if top.time_s > 0 else 1.0
        source = (f"NVML energy counter over {self.profile_steps} training steps per limit "
                  f"({len(sweep.limits)} limits, {self.step_w:g} W apart), Zeus cost eta={self.eta:g}")
        self.figures["efficiency/power_limit_w"] = Figure(best.limit_w, "W", "measured", source)
        self.figures["efficiency/power_limit_samples_per_j_ratio"] = Figure(
            energy_ratio, "x", "measured", f"energy per step at {top.limit_w:g} W / at {best.limit_w:g} W; {source}")
        self.figures["efficiency/power_limit_step_time_ratio"] = Figure(
            time_ratio, "x", "measured", f"step time at {best.limit_w:g} W / at {top.limit_w:g} W; {source}")
        reporter.metric("efficiency/power_limit_w", best.limit_w)
        self.decide(state, reporter, best.limit_w < top.limit_w,
                    f"{best.limit_w:g} W (max {top.limit_w:g} W): {energy_ratio:.2f}× samples/J at "
                    f"{time_ratio:.2f}× step time", measurements=[m.to_dict() for m in sweep.measurements],
                    limit_w=best.limit_w)
