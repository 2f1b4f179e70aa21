"""Calling one policy hook outside a Trainer, as the Trainer does: `(event, state, reporter)`."""

from __future__ import annotations

from typing import Any

from greenstack.engine.reporter import DecisionLog, Reporter


def fire(policy: Any, event: Any, state: Any, log: DecisionLog | None = None) -> Reporter:
    """Dispatch `event` to `policy` with a reporter writing into `state.metrics`; returns the reporter."""
    reporter = Reporter.for_state(state, getattr(policy, "name", ""), log)
    policy(event, state, reporter)
    return reporter
