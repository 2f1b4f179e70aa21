"""The one channel through which a policy reports what it measured and what it decided.

Every hook is called as `policy(event, state, reporter)`. A policy never writes into the loop's metric
buffer or a log file itself: it tells its `Reporter`, which knows where things go:

- `reporter.metric(name, value)` / `reporter.metrics({...})`: a figure for the next metrics line
  (metrics.jsonl and trackers; the Trainer flushes them after the event, at logging points);
- `reporter.decision(kind, data)`: a decision with an explicit audit kind (`schedule`, `pause`, `region`,
  `efficiency`, `alert`, `compression`, `checkpoint`, `federated`, ...), kept in the run's decision log
  (`DecisionLog`) in the order taken; audit.jsonl is written from it (greenstack/ledger/audit.py).

The Trainer builds one reporter per policy (bound to the policy's name) over the run's metric buffer
(`state.metrics`) and the run's `DecisionLog`. Code that calls a hook outside a Trainer (tests, the
start-time scheduler wait) builds one with `Reporter.for_state(state, policy)`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ReportedDecision:
    """One decision as reported: which policy took it, its audit kind, and its data."""

    policy: str
    kind: str
    data: Mapping[str, Any]


@dataclass
class DecisionLog:
    """The run's decisions in the order they were taken; listeners (the audit log) see each at once."""

    entries: list[ReportedDecision] = field(default_factory=list)
    listeners: list[Callable[[ReportedDecision], None]] = field(default_factory=list)

    def add(self, decision: ReportedDecision) -> None:
        self.entries.append(decision)
        for listener in self.listeners:
            listener(decision)

    def by(self, policy: str) -> list[ReportedDecision]:
        """The decisions of one policy, in order."""
        return [d for d in self.entries if d.policy == policy]


class Reporter:
    """A policy's view of the run's outputs: metrics for the next metrics line and decisions for the audit."""

    __slots__ = ("policy", "_metrics", "log")

    def __init__(self, metrics: dict[str, Any], policy: str = "", log: DecisionLog | None = None) -> None:
        self.policy = policy
        self._metrics = metrics
        self.log = log if log is not None else DecisionLog()

    @classmethod
    def for_state(cls, state: Any, policy: str = "", log: DecisionLog | None = None) -> Reporter:
        """A reporter writing into `state.metrics` (hooks called outside a Trainer)."""
        return cls(state.metrics, policy, log)

    def metric(self, name: str, value: Any) -> None:
        """One figure for the next metrics line (`name` carries its unit, e.g. `carbon/total_kg_co2e`)."""
        self._metrics[name] = value

    def metrics(self, values: Mapping[str, Any]) -> None:
        """Several figures for the next metrics line."""
        self._metrics.update(values)

    def decision(self, kind: str, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """Record a decision of audit kind `kind` (a non-empty word); returns `data`."""
        if not kind or not isinstance(kind, str):
            raise ValueError(f"{self.policy or 'policy'}: a decision needs an audit kind, got {kind!r}")
        self.log.add(ReportedDecision(self.policy, kind, data))
        return data
