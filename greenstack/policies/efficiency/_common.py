"""Shared pieces of the efficiency policies: argument checks, decision records, probes and figures.

Every decision (on/off, why, what was measured) is logged as one line (`amp: off — bf16 3.1× slower
than fp32 on this CPU`), reported as a metric (`reporter.metric`: metrics.jsonl and W&B) and appended
to the policy's JSON-able `decisions` list, from which an audit log can be written later.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Annotated, Any, ClassVar

import torch

from greenstack.efficiency.probe import Comparison, Variant, compare, energy_reader_from
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import Problem, at_least, is_bool
from greenstack.io import jsonable
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")
MODES = ("auto", "on", "off")
#: constraints shared by the efficiency policies' parameters (declared on each signature, errors.checked)
Enabled = Annotated[bool, is_bool()]
Speedup = Annotated[float, at_least(1.0, fix="the gain a probe must show to switch")]
Count = Annotated[int, at_least(1, integer=True)]
Steps = Annotated[int, at_least(0, integer=True)]


def config_key(policy: EfficiencyPolicy) -> str:
    """`efficiency.<key>`: where a policy's settings are (errors.checked prefixes its problems with it)."""
    return f"efficiency.{policy.key}"
#: why an `auto` policy of a deterministic run did not measure (timings differ from run to run)
FROZEN_WHY = ("trainer.deterministic: timing-based choice frozen, kept the current configuration "
              "(replay a measured run's choices with efficiency.decisions_from=RUN_DIR)")
RESTORED_WHY = "decision restored from the checkpoint"
#: each variant of a probe runs at least this long (more rounds, up to 4x `probe_rounds`, for fast steps)
MIN_PROBE_S = 0.5


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def train_loader_of(state: State) -> Any:
    """The run's train DataLoader (for sampling probe batches and for samplers), or None: the loop keeps
    `state.train_loader` current (it is rebuilt when the batch size changes)."""
    return state.train_loader


def sample_batch(loader: Any, n: int, device: torch.device) -> dict[str, Any]:
    """A batch of the first `n` training samples, built with the loader's collate (no RNG consumed)."""
    from greenstack.engine.loop import move_to

    dataset = loader.dataset
    n = min(n, len(dataset))
    return move_to(loader.collate_fn([dataset[i] for i in range(n)]), device)


def device_words(device: torch.device) -> str:
    """'this CPU' or 'this NVIDIA H200' for decision lines."""
    if device.type == "cuda":
        return f"this {torch.cuda.get_device_name(device)}"
    return f"this {device.type.upper()}"


class ProbeOutOfMemory(Exception):
    """The probe's model copies or activations did not fit: memory is tight (the run itself may fit)."""


class EfficiencyPolicy(Policy):
    """Base: `enabled` switch, a decision record, resume of the decision, and the standard figures."""

    role = Role.MODIFIER

    audit_kind = "efficiency"

    key: ClassVar[str] = ""

    def __init__(self, enabled: bool, problems: list[Problem]) -> None:
        Policy.__init__(self, name=f"efficiency.{self.key}")
        if not isinstance(enabled, bool):
            problems.append(Problem(self.param("enabled"), enabled, "must be true or false"))
        self.enabled = bool(enabled)
        self.decisions: list[dict[str, Any]] = []
        self.on: bool | None = None
        self.reason = ""
        self.figures: dict[str, Figure] = {}
        self.restored: dict[str, Any] | None = None
        #: how `restored` came about, for decision lines (a checkpoint, or a replayed run's record)
        self.restored_why = RESTORED_WHY
        self.decided = False

    def param(self, name: str) -> str:
        return f"{self.name}.{name}"

    def handles(self, event: Event, state: State) -> bool:
        return self.enabled and super().handles(event, state)

    def _entry(self, state: State, **data: Any) -> dict[str, Any]:
        return jsonable({"policy": self.name, "step": state.step, "epoch": state.epoch,
                         "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **data})

    def decide(self, state: State, reporter: Reporter, on: bool, reason: str, *, level: int = logging.INFO,
               **data: Any) -> None:
        """Record the policy's decision: one log line, a metric, a decision entry."""
        self.decided, self.on, self.reason = True, on, reason
        log.log(level, "%s: %s — %s", self.key, "on" if on else "off", reason)
        reporter.metric(f"efficiency/{self.key}_enabled", int(on))
        self.record_decision(reporter, self._entry(state, on=on, reason=reason, **data))

    def warn(self, state: State, reporter: Reporter, message: str, **data: Any) -> None:
        """A no-effect or misuse warning (logged and recorded, no state change)."""
        log.warning("%s: %s", self.key, message)
        self.record_decision(reporter, self._entry(state, warning=message, **data))

    def record_decision(self, reporter: Reporter, entry: dict[str, Any]) -> None:
        """Keep a decision (policy state, summary, replay) and report it with this policy's audit kind."""
        self.decisions.append(entry)
        reporter.decision(self.audit_kind, entry)

    def recorded_decisions(self) -> list[dict[str, Any]]:
        return self.decisions

    def state_dict(self) -> dict[str, Any]:
        return {"on": self.on, "reason": self.reason, "decisions": list(self.decisions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restored = dict(state)
        self.decisions = list(state.get("decisions", []))

    def replay(self, entries: list[dict[str, Any]], source: str) -> bool:
        """Take the recorded run's first decision instead of measuring (`efficiency.decisions_from`).

        `entries` are this policy's decision records from that run's audit log, in order; the first one
        with an on/off choice is the measured one (a resumed run later repeats it as "restored").
        """
        first = next((e for e in entries if isinstance(e.get("on"), bool)), None)
        if first is None:
            return False
        self.restored, self.restored_why = dict(first), f"decision replayed from {source}"
        return True

    def summary(self) -> dict[str, Any]:
        figures = dict(self.figures)
        if self.on is not None:
            figures[f"efficiency/{self.key}_enabled"] = Figure(int(self.on), "bool", "measured", self.reason)
        return figures


class ProbingPolicy(EfficiencyPolicy):
    """An efficiency policy that decides at the first batch by probing with and without itself."""

    events = frozenset({Event.BATCH_START})

    def __init__(self, enabled: bool, mode: str, problems: list[Problem], *, min_speedup: float = 1.05,
                 probe_steps: int = 1, probe_rounds: int = 3) -> None:
        """Subclasses declare the constraints on their own signatures (`Enabled`, `Speedup`, `Count`,
        a `Literal` of modes) under `errors.checked(config_key)`."""
        super().__init__(enabled, problems)
        self.mode, self.min_speedup = mode, float(min_speedup)
        self.probe_steps, self.probe_rounds = probe_steps, probe_rounds

    def probe(self, state: State, baseline: Variant, candidate: Variant, *, measure_memory: bool = False) -> Comparison:
        """Time baseline vs candidate on the current batch, each on a private copy of the model.

        Any win, and a marginal or inconsistent result, is probed a second time and the samples pooled:
        a configuration switched on by a burst of noise would leave `auto` slower than `none`, while
        confirming a real win costs little next to the time it saves.
        """
        def run() -> Comparison:
            return compare(state.model, state.batch, baseline, candidate, device=state.device,
                           steps=self.probe_steps, rounds=self.probe_rounds, energy=energy_reader_from(state),
                           measure_memory=measure_memory, min_seconds=MIN_PROBE_S,
                           max_rounds=4 * self.probe_rounds)

        try:
            cmp = run()
            return cmp.pooled(run()) if cmp.helps(self.min_speedup) or self.marginal(cmp) else cmp
        except Exception as e:  # noqa: BLE001 - only OOM is turned into a decision; the rest propagates
            from greenstack.efficiency.batch_size import is_out_of_memory

            if not is_out_of_memory(e):
                raise
            if state.device.type == "cuda":
                torch.cuda.empty_cache()
            raise ProbeOutOfMemory(str(e).splitlines()[0][:160]) from e

    def marginal(self, cmp: Comparison) -> bool:
        """Worth a second look: close to the threshold in either direction, or the fastest and the
        median step disagree about it."""
        g, m = self.min_speedup, self.min_speedup * 1.1
        if cmp.basis == "samples/s" and (cmp.speedup >= g) != (cmp.median_speedup >= g):
            return True
        return (cmp.helps(g) and cmp.gain < m) or (cmp.hurts(g) and cmp.gain > 1 / m)

    def probe_source(self, state: State, cmp: Comparison) -> str:
        n = cmp.baseline.samples_per_step
        return (f"probe on the first batch ({n} samples, {state.device}): {cmp.candidate.name} vs "
                f"{cmp.baseline.name}, fastest of {len(cmp.baseline.steps_s)} interleaved fwd+bwd steps each "
                f"(median ratio {cmp.median_speedup:.3g})")

    def record_comparison(self, state: State, reporter: Reporter, cmp: Comparison) -> None:
        """The measured effect as figures for sustainability.json and metrics for the tracker."""
        source = self.probe_source(state, cmp)
        self.figures[f"efficiency/{self.key}_speedup"] = Figure(cmp.speedup, "x", "measured", source)
        reporter.metric(f"efficiency/{self.key}_speedup", cmp.speedup)
        if cmp.energy_ratio is not None and cmp.energy_provenance == "measured":  # modelled joules = time again
            self.figures[f"efficiency/{self.key}_samples_per_j_ratio"] = Figure(
                cmp.energy_ratio, "x", cmp.energy_provenance or "fallback",  # type: ignore[arg-type]
                f"{source}; energy: {cmp.energy_source}")
            reporter.metric(f"efficiency/{self.key}_samples_per_j_ratio", cmp.energy_ratio)

    def comparison_data(self, cmp: Comparison) -> dict[str, Any]:
        return {"basis": cmp.basis, "gain": cmp.gain, "speedup": cmp.speedup, "median_speedup": cmp.median_speedup,
                "energy_ratio": cmp.energy_ratio, "steps_per_variant": len(cmp.baseline.steps_s),
                "baseline": {"name": cmp.baseline.name, "step_s": cmp.baseline.step_s,
                             "energy_j_per_step": cmp.baseline.energy_j_per_step},
                "candidate": {"name": cmp.candidate.name, "step_s": cmp.candidate.step_s,
                              "energy_j_per_step": cmp.candidate.energy_j_per_step},
                "energy_source": cmp.energy_source}

    def short_of(self, cmp: Comparison) -> str:
        """Why a candidate that looked faster was not kept (for the decision line)."""
        if cmp.basis == "samples/s" and cmp.speedup >= self.min_speedup:
            return f", but only {cmp.median_speedup:.2f}× in the median step: not a consistent gain"
        return f", below min_speedup {self.min_speedup:g}"

    def restored_choice(self) -> bool | None:
        """The decision saved in a checkpoint (a resumed run keeps it instead of probing again)."""
        if self.restored is None or self.restored.get("on") is None:
            return None
        return bool(self.restored["on"])

    def frozen(self, state: State) -> bool:
        """A deterministic run's `auto` choice with no recorded decision: keep the current configuration."""
        return state.deterministic and self.mode == "auto" and self.restored_choice() is None

    def settled_without_probe(self, state: State, reporter: Reporter, apply: Callable[[State, Reporter, bool, str], None]) -> bool:
        """mode=off, a decision restored from a checkpoint or replayed from a recorded run, or a frozen
        deterministic choice: nothing to measure. True when settled (`apply(state, reporter, on, reason)` called)."""
        if self.mode == "off":
            self.decide(state, reporter, False, "mode=off")
            return True
        restored = self.restored_choice()
        if restored is not None:
            apply(state, reporter, restored, self.restored_why)
            return True
        if self.frozen(state):
            apply(state, reporter, False, FROZEN_WHY)
            return True
        return False
