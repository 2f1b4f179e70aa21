"""Replay a recorded run's measured decisions: `efficiency.decisions_from=RUN_DIR`.

Why: `auto` efficiency policies, acting alerts, the batch-size search and the region choice decide from
timings, utilisation and prices that differ from run to run, so a rerun (or every job of a sweep) could
train another configuration than the run it repeats. Every such decision is already in the run's
hash-chained `audit.jsonl` (greenstack/ledger/audit.py); replaying reads it back, checks the chain, and
hands each policy its own records (`policy.replay(entries, source)`), so it decides once from the record
instead of measuring: same precision, attention, memory format, checkpointing, compile, padding, batch
sizes (before training and mid-run, at the same steps) and region.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from greenstack.errors import ConfigError, Problem

log = logging.getLogger("greenstack")
KEY = "efficiency.decisions_from"


@dataclass
class RecordedDecisions:
    """One run's decisions, grouped by the policy that took them (in the order taken)."""

    source: str
    by_policy: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def audit_path(run_dir: str | Path) -> Path:
    from greenstack.ledger.audit import RUN_AUDIT_FILE

    path = Path(run_dir).expanduser()
    return path if path.is_file() else path / RUN_AUDIT_FILE


def load_decisions(run_dir: str | Path, key: str = KEY) -> RecordedDecisions:
    """The decisions recorded in `run_dir/audit.jsonl` (or that file given directly), chain verified."""
    from greenstack.ledger.audit import verify

    path = audit_path(run_dir)
    if not path.is_file():
        raise ConfigError(Problem(key, str(run_dir), f"no decision log at {path}",
                                  "point it at the run directory of a finished greenstack run (it holds audit.jsonl)"))
    result = verify(path, require_head=False)
    if not result.ok:
        raise ConfigError(Problem(key, str(run_dir), f"{path} fails verification ({result.problems[0].format()})",
                                  "replay only an untouched decision log (`greenstack audit verify` names the edit)"))
    recorded = RecordedDecisions(source=str(path.parent))
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        data = json.loads(line).get("data")
        if isinstance(data, Mapping) and isinstance(data.get("policy"), str):
            recorded.by_policy.setdefault(data["policy"], []).append(dict(data))
    return recorded


def check_decisions_from(cfg: Mapping[str, Any]) -> list[Problem]:
    """Config check (validate_config): the replay source must exist and verify."""
    efficiency = cfg.get("efficiency") if hasattr(cfg, "get") else None
    source = efficiency.get("decisions_from") if isinstance(efficiency, Mapping) or hasattr(efficiency, "get") else None
    if source is None:
        return []
    if not isinstance(source, str) or not source:
        return [Problem(KEY, source, "must be a run directory (a path)", f"{KEY}=outputs/DATE/TIME")]
    try:
        load_decisions(source)
    except ConfigError as e:
        return e.problems
    return []


def apply_replay(recorded: RecordedDecisions | None, policies: Iterable[Any]) -> list[str]:
    """Hand each policy with a `replay` method its recorded decisions; the names of those that took them."""
    if recorded is None:
        return []
    taken = []
    for policy in policies:
        entries = recorded.by_policy.get(policy.name, [])
        # an empty record counts too: alerts that never acted in the recorded run must not act now
        if policy.replay(entries, recorded.source):
            taken.append(policy.name)
    if taken:
        log.info("replaying decisions of %s for: %s", recorded.source, ", ".join(taken))
    return taken
