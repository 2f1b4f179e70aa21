"""Scheduling decisions as JSON-able records: inputs, chosen option, expected saving.

Why a record per decision: a carbon-aware scheduler changes when and where work runs, so every
choice must be explainable afterwards. Each policy keeps its `decisions` list, logs each one, mirrors
its numbers into a metrics dict (the policy reports them: trackers such as W&B get them at the next flush) and calls
every registered listener - the hook through which the hash-chained audit log attaches later
(`recorder.listeners.append(audit.append)`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from greenstack.io import jsonable

log = logging.getLogger("greenstack")


@dataclass
class Decision:
    """One scheduling decision."""

    policy: str
    action: str  # e.g. start_now, wait, start, pause, resume, choose_region
    at: datetime
    inputs: dict[str, Any]
    choice: dict[str, Any]
    expected_saving_pct: float | None = None
    provenance: str = "estimated"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return jsonable({"policy": self.policy, "action": self.action, "at": self.at, "inputs": self.inputs,
                         "choice": self.choice, "expected_saving_pct": self.expected_saving_pct,
                         "provenance": self.provenance, "notes": self.notes})


class DecisionRecorder:
    """Keeps a policy's decisions, logs them, and forwards them to trackers and listeners."""

    def __init__(self, policy: str, metric_prefix: str = "scheduler") -> None:
        self.policy = policy
        self.prefix = metric_prefix
        self.decisions: list[dict[str, Any]] = []
        #: called with each decision's dict (the audit log registers itself here)
        self.listeners: list[Callable[[dict[str, Any]], None]] = []

    def record(self, decision: Decision, metrics: dict[str, Any] | None = None,
               numbers: dict[str, float] | None = None) -> dict[str, Any]:
        """Store, log and forward one decision; `numbers` go to `metrics` under the prefix."""
        record = decision.to_dict()
        self.decisions.append(record)
        saving = record["expected_saving_pct"]
        log.info("%s: %s%s%s", self.policy, decision.action,
                 f" ({json.dumps(record['choice'], default=str)})" if record["choice"] else "",
                 f", expected saving {saving:.1f} %" if isinstance(saving, (int, float)) else "")
        for note in decision.notes:
            log.info("%s: %s", self.policy, note)
        if metrics is not None:
            out = {f"{self.prefix}/decisions": float(len(self.decisions))}
            if isinstance(saving, (int, float)):
                out[f"{self.prefix}/expected_saving_pct"] = float(saving)
            for key, value in (numbers or {}).items():
                if isinstance(value, (int, float, np.number)) and math.isfinite(float(value)):
                    out[f"{self.prefix}/{key}"] = float(value)
            metrics.update(out)
        for listener in self.listeners:
            listener(record)
        return record
