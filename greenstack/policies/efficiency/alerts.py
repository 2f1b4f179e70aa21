"""Alerts that act: low GPU utilisation, high carbon intensity, memory pressure, a loss plateau.

| alert               | metric                                  | act                                       |
|---------------------|-----------------------------------------|-------------------------------------------|
| low_gpu_utilization | efficiency/gpu_utilization (%)          | double the batch size (LR scaled)         |
| carbon_intensity    | carbon/intensity_g_per_kwh              | request a pause: state.requests.pause     |
| memory_pressure     | efficiency/memory_pressure (fraction)   | turn on activation checkpointing          |
| plateau             | val/loss (configurable)                 | stop the run (state.request_stop)         |

Each alert has `action: act | warn | off`. Every firing is logged with the metric value that
triggered it, reported as the metric `alerts/<name>`, and appended to `decisions`.

Hand-off contract with the scheduler (its pause policy lives in greenstack/policies/scheduler/):
`state.requests.pause` is a `PauseRequest(by, reason, metric, value, threshold, step, at)` while the
intensity is above the threshold. The scheduler pauses when it sees it and clears it once it has acted
(`state.requests.pause = None`). If the intensity falls back below the threshold before anyone acted,
this policy withdraws its own request.

Low GPU utilisation acts twice: at FIT_START, on readings taken while a copy of the model trains a
few steps (the batch size is set before the first step); and mid-run, by putting
`state.requests.batch_size = BatchSizeRequest(batch_size, reason, by, step, lr_scaling)`, which the loop
applies at the next epoch start (engine/resize.py: same sampler, re-planned run, LR scaled by
`lr_scaling`); the applied change is then logged as a decision of this policy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import torch

from greenstack.efficiency.alerts import ACTIONS, PlateauRule, ThresholdRule
from greenstack.efficiency.batch_size import is_out_of_memory, lr_scale_factor, scale_learning_rate_
from greenstack.efficiency.checkpointing import Unsupported, apply_activation_checkpointing
from greenstack.efficiency.probe import device_memory_bytes, isolated, synchronize, train_step
from greenstack.engine.events import Event
from greenstack.engine.policy import Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.requests import BatchSizeRequest, PauseRequest
from greenstack.engine.state import State
from greenstack.errors import ConfigError, Problem
from greenstack.policies.efficiency._common import (
    FROZEN_WHY,
    EfficiencyPolicy,
    is_number,
    sample_batch,
    train_loader_of,
)
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")
#: alerts whose readings (GPU utilisation, memory in use) differ from run to run: frozen when deterministic
TIMING_ALERTS = ("low_gpu_utilization", "memory_pressure")
UTIL_METRIC, CARBON_METRIC, MEMORY_METRIC = ("efficiency/gpu_utilization", "carbon/intensity_g_per_kwh",
                                             "efficiency/memory_pressure")

DEFAULTS: dict[str, dict[str, Any]] = {
    "low_gpu_utilization": {"action": "act", "threshold_percent": 50.0, "patience": 3, "max_batch_size": 4096,
                            "lr_scaling": "sqrt", "probe_steps": 3, "max_doublings": 3},
    "carbon_intensity": {"action": "act", "threshold_g_per_kwh": 400.0, "patience": 1},
    "memory_pressure": {"action": "act", "threshold_fraction": 0.9, "patience": 1},
    "plateau": {"action": "act", "monitor": "val/loss", "mode": "min", "patience": 5, "min_delta": 0.0},
}
_POSITIVE_INTS = ("patience", "max_batch_size", "probe_steps")


def _settings(name: str, given: Any, problems: list[Problem]) -> dict[str, Any]:
    """The alert's defaults overlaid with what the config gives, every bad key reported."""
    settings = dict(DEFAULTS[name])
    if given is None:
        return settings
    if not isinstance(given, Mapping):
        problems.append(Problem(f"efficiency.alerts.{name}", given, "must be a mapping of settings",
                                f"keys: {', '.join(DEFAULTS[name])}"))
        return settings
    for key, value in dict(given.items()).items():
        path = f"efficiency.alerts.{name}.{key}"
        if key not in DEFAULTS[name]:
            problems.append(Problem(path, value, "unknown setting", f"valid: {', '.join(DEFAULTS[name])}"))
            continue
        default = DEFAULTS[name][key]
        if key == "action" and value not in ACTIONS:
            problems.append(Problem(path, value, "unknown action", "use act, warn or off"))
        elif key == "mode" and value not in ("min", "max"):
            problems.append(Problem(path, value, "must be min or max"))
        elif key == "lr_scaling" and value not in ("linear", "sqrt", "none"):
            problems.append(Problem(path, value, "unknown rule", "use linear, sqrt or none"))
        elif key in _POSITIVE_INTS and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            problems.append(Problem(path, value, "must be an integer >= 1"))
        elif key == "max_doublings" and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            problems.append(Problem(path, value, "must be an integer >= 0"))
        elif isinstance(default, float) and (not is_number(value) or value < 0):
            problems.append(Problem(path, value, "must be a number >= 0"))
        elif key == "threshold_fraction" and value > 1:
            problems.append(Problem(path, value, "must be a fraction within [0, 1]"))
        elif isinstance(default, str) and not isinstance(value, str):
            problems.append(Problem(path, value, "must be a string"))
        settings[key] = value
    return settings


def nvml_utilization_reader(device: torch.device) -> Callable[[], float] | None:
    """GPU utilisation (%) of `device` from NVML, or None where NVML cannot read it."""
    if device.type != "cuda":
        return None
    from greenstack.efficiency.power_limit import load_nvml, nvml_device_handle

    try:
        nvml = load_nvml()
        handle, _ = nvml_device_handle(nvml, device.index if device.index is not None else torch.cuda.current_device())
        nvml.nvmlDeviceGetUtilizationRates(handle)
    except Exception:  # noqa: BLE001 - PowerLimitUnavailable or any NVML error: no readings
        return None
    return lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)


def default_memory_reader(device: torch.device) -> Callable[[], float]:
    """Memory pressure as a fraction: reserved GPU memory / device memory, or RSS / RAM on CPU.

    Reserved (not peak) memory, so the measurement's end-of-run peak statistics stay untouched.
    """
    total = device_memory_bytes(device)
    if device.type == "cuda":
        return lambda: torch.cuda.memory_reserved(device) / total
    import psutil

    process = psutil.Process()
    return lambda: process.memory_info().rss / total


class Alerts(EfficiencyPolicy):
    """Watches the metric stream and acts (or warns) when an alert fires; see the module docstring."""

    role = Role.OBSERVER

    audit_kind = "alert"

    key = "alerts"
    events = frozenset({Event.FIT_START, Event.STEP_END, Event.EVAL_END})

    def __init__(self, enabled: bool = True, check_interval: int = 10,
                 low_gpu_utilization: dict[str, Any] | None = None, carbon_intensity: dict[str, Any] | None = None,
                 memory_pressure: dict[str, Any] | None = None, plateau: dict[str, Any] | None = None,
                 utilization_reader: Callable[[], float] | None = None,
                 memory_reader: Callable[[], float] | None = None) -> None:
        problems: list[Problem] = []
        super().__init__(enabled, problems)
        if not isinstance(check_interval, int) or isinstance(check_interval, bool) or check_interval < 1:
            problems.append(Problem(self.param("check_interval"), check_interval, "must be an integer >= 1"))
        self.settings = {"low_gpu_utilization": _settings("low_gpu_utilization", low_gpu_utilization, problems),
                         "carbon_intensity": _settings("carbon_intensity", carbon_intensity, problems),
                         "memory_pressure": _settings("memory_pressure", memory_pressure, problems),
                         "plateau": _settings("plateau", plateau, problems)}
        if problems:
            raise ConfigError(problems)
        s = self.settings
        self.check_interval = check_interval
        self.rules: dict[str, ThresholdRule | PlateauRule] = {
            "low_gpu_utilization": ThresholdRule("low_gpu_utilization", UTIL_METRIC,
                                                 float(s["low_gpu_utilization"]["threshold_percent"]), above=False,
                                                 patience=s["low_gpu_utilization"]["patience"]),
            "carbon_intensity": ThresholdRule("carbon_intensity", CARBON_METRIC,
                                              float(s["carbon_intensity"]["threshold_g_per_kwh"]), above=True,
                                              patience=s["carbon_intensity"]["patience"]),
            "memory_pressure": ThresholdRule("memory_pressure", MEMORY_METRIC,
                                             float(s["memory_pressure"]["threshold_fraction"]), above=True,
                                             patience=s["memory_pressure"]["patience"]),
            "plateau": PlateauRule("plateau", s["plateau"]["monitor"], s["plateau"]["mode"], s["plateau"]["patience"],
                                   float(s["plateau"]["min_delta"])),
        }
        self.utilization_reader, self.memory_reader = utilization_reader, memory_reader
        self.fired: dict[str, int] = dict.fromkeys(self.rules, 0)
        self._applied_seen = 0  # batch-size changes (state.batch_size_changes) already logged as decisions
        self.acted: dict[str, int] = dict.fromkeys(self.rules, 0)
        #: acting firings of the timing/utilisation-based alerts of a recorded run (efficiency.decisions_from)
        self.replayed: list[dict[str, Any]] | None = None
        self.replay_source = ""
        #: deterministic run or replay: measured utilisation and memory no longer change the run
        self.frozen = False

    def action(self, name: str) -> str:
        action = self.settings[name]["action"]
        return "warn" if action == "act" and self.frozen and name in TIMING_ALERTS else action

    def replay(self, entries: list[dict[str, Any]], source: str) -> bool:
        """Act where the recorded run acted (same step, same batch size), instead of on live readings."""
        self.replayed = [e for e in entries if e.get("acted") is True and e.get("alert") in TIMING_ALERTS]
        self.replay_source = source
        return True

    # -- events -----------------------------------------------------------------------------------
    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.FIT_START:
            self._fit_start(state, reporter)
        elif event is Event.STEP_END:
            if len(state.batch_size_changes) > self._applied_seen:
                self._record_applied(state, reporter)
            if self.replayed:
                self._replay_at(state, reporter, before_training=False)
            if self.action("low_gpu_utilization") != "off" and UTIL_METRIC in state.metrics:
                self._utilization(state, reporter, float(state.metrics[UTIL_METRIC]))
            if self.action("carbon_intensity") != "off" and CARBON_METRIC in state.metrics:
                self._carbon(state, reporter, float(state.metrics[CARBON_METRIC]))
            if self.action("memory_pressure") != "off" and state.step % self.check_interval == 0:
                self._memory(state, reporter)
        elif event is Event.EVAL_END:
            rule = self.rules["plateau"]
            if self.action("plateau") != "off" and rule.metric in state.metrics:
                self._plateau(state, reporter, float(state.metrics[rule.metric]))

    def _fit_start(self, state: State, reporter: Reporter) -> None:
        if self.memory_reader is None:
            self.memory_reader = default_memory_reader(state.device)
        self.frozen = state.deterministic or self.replayed is not None
        if self.settings["low_gpu_utilization"]["action"] == "off":
            return
        if self.replayed is not None:
            if state.step == 0:
                self._replay_at(state, reporter, before_training=True)
            return
        if self.frozen:
            log.info("alerts: low_gpu_utilization warns only — %s", FROZEN_WHY)
            self.record_decision(reporter, self._entry(state, alert="low_gpu_utilization", skipped=FROZEN_WHY))
            return
        if self.utilization_reader is None:
            self.utilization_reader = nvml_utilization_reader(state.device)
        if self.utilization_reader is None:
            why = ("no GPU utilisation on CPU (NVML measures NVIDIA GPUs only)" if state.device.type != "cuda"
                   else "NVML cannot read this GPU's utilisation")
            log.info("alerts: low_gpu_utilization skipped — %s", why)
            self.record_decision(reporter, self._entry(state, alert="low_gpu_utilization", skipped=why))
            return
        if state.step == 0:
            self._raise_batch_before_training(state, reporter)

    # -- the four alerts --------------------------------------------------------------------------
    def _fire(self, state: State, reporter: Reporter, name: str, value: float, did: str, *, acted: bool, **data: Any) -> None:
        rule = self.rules[name]
        threshold = getattr(rule, "threshold", None)
        self.fired[name] += 1
        self.acted[name] += int(acted)
        reporter.metric(f"alerts/{name}", value)
        action = self.action(name)
        comparison = (f"{'>' if getattr(rule, 'above', False) else '<'} {threshold:g}" if threshold is not None
                      else f"no improvement for {getattr(rule, 'patience', 0)} evaluations")
        log.warning("alerts: %s — %s=%.4g %s: %s", name, rule.metric, value, comparison,
                    did if action == "act" else f"warn only (would: {did})")
        self.record_decision(reporter, self._entry(state, alert=name, metric=rule.metric, value=value, threshold=threshold,
                                                   action=action, acted=acted, did=did, **data))

    def _utilization(self, state: State, reporter: Reporter, value: float) -> None:
        rule = self.rules["low_gpu_utilization"]
        if not rule.update(value):
            return
        pending = state.requests.batch_size
        if pending is not None and pending.by == self.name:
            return  # already asked; the loop applies it at the next epoch start
        target = self._doubled(state, state.batch_size)
        if target is None:
            self._fire(state, reporter, "low_gpu_utilization", value, "no larger batch possible", acted=False)
            return
        request = BatchSizeRequest(batch_size=target, reason=f"{UTIL_METRIC}={value:.3g} < {rule.threshold:g}",
                                   by=self.name, step=state.step,
                                   lr_scaling=self.settings["low_gpu_utilization"]["lr_scaling"])
        act = self.action("low_gpu_utilization") == "act"
        if act:
            state.requests.batch_size = request
        self._fire(state, reporter, "low_gpu_utilization", value,
                   f"raise the batch size {state.batch_size} → {target} at the next epoch start "
                   f"(LR by the {request.lr_scaling} rule)", acted=act, batch_size=target)

    def _record_applied(self, state: State, reporter: Reporter) -> None:
        """Log the batch-size changes the loop made on this policy's requests (engine/resize.py)."""
        changes = [c for c in state.batch_size_changes if c.get("by") == self.name]
        for change in changes[self._applied_seen:]:
            self.record_decision(reporter, self._entry(state, alert="low_gpu_utilization", applied=dict(change),
                                                       did=f"batch size {change['from']} → {change['to']} at step "
                                                           f"{change['step']} (LR ×{change['lr_factor']:.3g})"))
        if len(changes) > self._applied_seen:  # readings at the new size count afresh (it may fire again)
            self.rules["low_gpu_utilization"].consecutive = 0  # type: ignore[union-attr]
        self._applied_seen = len(changes)

    def _carbon(self, state: State, reporter: Reporter, value: float) -> None:
        rule = self.rules["carbon_intensity"]
        request = state.requests.pause
        if not rule.beyond(value) and request is not None and request.by == self.name:
            state.requests.pause = None
            log.info("alerts: carbon_intensity back to %.4g g/kWh: withdrew the pause request", value)
            self.record_decision(reporter, self._entry(state, alert="carbon_intensity", metric=rule.metric, value=value,
                                                       did="withdrew the pause request"))
        if not rule.update(value):
            return
        act = self.action("carbon_intensity") == "act"
        if act:
            state.requests.pause = PauseRequest(
                by=self.name, reason=f"carbon intensity {value:.0f} g/kWh > {rule.threshold:g} g/kWh",
                metric=rule.metric, value=value, threshold=rule.threshold, step=state.step,
                at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        self._fire(state, reporter, "carbon_intensity", value, "requested a pause (state.requests.pause)", acted=act)

    def _memory(self, state: State, reporter: Reporter) -> None:
        assert self.memory_reader is not None
        value = float(self.memory_reader())
        reporter.metric(MEMORY_METRIC, value)
        if not self.rules["memory_pressure"].update(value):
            return
        if self.action("memory_pressure") != "act":
            self._fire(state, reporter, "memory_pressure", value, "turn on activation checkpointing", acted=False)
            return
        try:
            method = apply_activation_checkpointing(state.model)
        except Unsupported as e:
            self._fire(state, reporter, "memory_pressure", value, f"cannot turn on activation checkpointing: {e}", acted=False)
            return
        self._fire(state, reporter, "memory_pressure", value, f"turned on activation checkpointing ({method})", acted=True)

    def _plateau(self, state: State, reporter: Reporter, value: float) -> None:
        rule = self.rules["plateau"]
        assert isinstance(rule, PlateauRule)
        if not rule.update(value):
            return
        act = self.action("plateau") == "act"
        did = f"stopped the run ({rule.metric} best {rule.best:.4g}, no improvement for {rule.patience} evaluations)"
        if act:
            state.request_stop(f"alerts.plateau: {did}")
        self._fire(state, reporter, "plateau", value, did, acted=act)

    def _replay_at(self, state: State, reporter: Reporter, *, before_training: bool) -> None:
        """Repeat the recorded run's actions taken at this step (batch raised before training at FIT_START)."""
        assert self.replayed is not None
        for entry in self.replayed:
            if entry.get("step") != state.step:
                continue
            name, target = str(entry["alert"]), entry.get("batch_size")
            did = f"{entry.get('did', '')} ({'decision replayed from ' + self.replay_source})"
            if name == "memory_pressure":
                try:
                    apply_activation_checkpointing(state.model)
                except Unsupported as e:
                    did = f"cannot turn on activation checkpointing: {e}"
            elif not isinstance(target, int):
                continue
            elif "readings" in entry:  # raised before training
                if not before_training or state.set_batch_size is None or target == state.batch_size:
                    continue
                start = int(state.batch_size)
                state.set_batch_size(target)
                factor = lr_scale_factor(start, target, self.settings["low_gpu_utilization"]["lr_scaling"])
                scale_learning_rate_(state.optimizer, state.lr_scheduler, factor)
            elif state.step > 0 and not before_training:
                state.requests.batch_size = BatchSizeRequest(
                    batch_size=target, reason=f"replayed from {self.replay_source}", by=self.name,
                    step=state.step, lr_scaling=self.settings["low_gpu_utilization"]["lr_scaling"])
            else:
                continue
            self.fired[name] += 1
            self.acted[name] += 1
            log.info("alerts: %s — %s", name, did)
            kept = {k: entry[k] for k in ("readings",) if k in entry}  # a replay of this run replays the same
            self.record_decision(reporter, self._entry(state, alert=name, acted=True, replayed=True, did=did,
                                                       batch_size=target, **kept))

    # -- low utilisation before training ----------------------------------------------------------
    def _doubled(self, state: State, batch_size: int) -> int | None:
        loader = train_loader_of(state)
        cap = int(self.settings["low_gpu_utilization"]["max_batch_size"])
        if loader is not None and hasattr(loader, "dataset"):
            cap = min(cap, len(loader.dataset))
        return batch_size * 2 if batch_size and batch_size * 2 <= cap else None

    def _raise_batch_before_training(self, state: State, reporter: Reporter) -> None:
        """Train a copy a few steps per batch size, read utilisation, double while it is low (then act once)."""
        settings, rule = self.settings["low_gpu_utilization"], self.rules["low_gpu_utilization"]
        loader = train_loader_of(state)
        if loader is None or not hasattr(loader, "dataset") or state.set_batch_size is None:
            return
        assert self.utilization_reader is not None
        model = copy.deepcopy(state.model)
        start = batch = int(state.batch_size)
        readings: list[dict[str, float]] = []
        for _ in range(settings["max_doublings"] + 1):
            try:
                with isolated(state.device):
                    sample = sample_batch(loader, batch, state.device)
                    for _ in range(settings["probe_steps"]):
                        train_step(model, sample, device=state.device, autocast_dtype=state.autocast_dtype)
                    synchronize(state.device)
            except Exception as e:  # noqa: BLE001 - an OOM ends the search at the previous size
                if not is_out_of_memory(e):
                    raise
                batch //= 2
                break
            value = float(self.utilization_reader())
            readings.append({"batch_size": batch, "utilization": value})
            if not rule.beyond(value):
                break
            larger = self._doubled(state, batch)
            if larger is None or self.action("low_gpu_utilization") != "act":
                break
            batch = larger
        del model
        if not readings or not rule.beyond(readings[0]["utilization"]):
            if readings:  # the check is on record too (a replay of this run then knows nothing acted)
                self.record_decision(reporter, self._entry(state, alert="low_gpu_utilization", acted=False, readings=readings,
                                                           did=f"kept batch size {start}: utilisation "
                                                               f"{readings[0]['utilization']:.3g} % ≥ {rule.threshold:g} %"))
            return
        first = readings[0]["utilization"]
        if batch == start or self.action("low_gpu_utilization") != "act":
            self._fire(state, reporter, "low_gpu_utilization", first, "no larger batch possible" if batch == start
                       else f"raise the batch size to {self._doubled(state, start)}", acted=False, readings=readings)
            return
        state.set_batch_size(batch)
        factor = lr_scale_factor(start, batch, settings["lr_scaling"])
        scale_learning_rate_(state.optimizer, state.lr_scheduler, factor)
        self._fire(state, reporter, "low_gpu_utilization", first,
                   f"raised the batch size {start} → {batch} before training (LR ×{factor:.3g}, "
                   f"{settings['lr_scaling']} rule)", acted=True, readings=readings, batch_size=batch)

    # -- persistence and report -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        plateau = self.rules["plateau"]
        assert isinstance(plateau, PlateauRule)
        return {**super().state_dict(), "fired": dict(self.fired), "acted": dict(self.acted),
                "plateau": {"best": plateau.best, "bad": plateau.bad}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.fired.update(state.get("fired", {}))
        self.acted.update(state.get("acted", {}))
        plateau = self.rules["plateau"]
        assert isinstance(plateau, PlateauRule)
        saved = state.get("plateau", {})
        plateau.best, plateau.bad = float(saved.get("best", plateau.best)), int(saved.get("bad", plateau.bad))

    def summary(self) -> dict[str, Any]:
        fired = ", ".join(f"{k}×{v}" for k, v in self.fired.items() if v) or "none"
        return {"efficiency/alerts_fired": Figure(sum(self.fired.values()), "count", "measured", f"fired: {fired}"),
                "efficiency/alerts_acted": Figure(sum(self.acted.values()), "count", "measured",
                                                  "firings that changed the run (others warned only)")}
