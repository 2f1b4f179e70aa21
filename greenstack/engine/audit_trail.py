"""Policies' decisions into the run's audit log (`ledger/audit.py`): hooked live to their decision
recorders, or appended at the end of a run. Here, in the engine layer, because it knows `Policy` and
the `Reporter`'s `DecisionLog`, which the ledger below must not import."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from greenstack.engine.policy import Policy
from greenstack.engine.reporter import DecisionLog
from greenstack.io import jsonable
from greenstack.ledger.audit import AuditLog, canonical, decision_kind
from greenstack.scheduling.decisions import DecisionRecorder


def record_policy_decisions(audit: AuditLog, policies: Iterable[Policy],
                            reported: DecisionLog | None = None) -> int:
    """At the end of a run, append each policy's `recorded_decisions()` unless its `decision_recorder()`
    wrote them live, then the decisions policies reported through their `Reporter` (`reported`, kind as
    reported), in policy order.

    Decisions already in the log (a resumed run restores its policies' decisions) are not written twice.
    Returns how many records were appended.
    """
    seen = {canonical(jsonable(r.get("data", {}))) for r in audit.records()}
    added = 0
    policies = list(policies)
    for policy in policies:
        recorder = policy.decision_recorder()
        if recorder is not None and audit_listening(recorder):
            continue
        for decision in policy.recorded_decisions():
            if not isinstance(decision, Mapping):
                continue
            data = {"policy": policy.name, **decision}
            if canonical(jsonable(data)) in seen:
                continue
            audit.append(decision_kind(decision, policy.audit_kind), data)
            seen.add(canonical(jsonable(data)))
            added += 1
    for policy in policies if reported is not None else ():
        for entry in reported.by(policy.name):
            data = {"policy": policy.name, **entry.data}
            if canonical(jsonable(data)) in seen:
                continue
            audit.append(entry.kind, data)
            seen.add(canonical(jsonable(data)))
            added += 1
    return added


def audit_listening(recorder: DecisionRecorder) -> bool:
    """Whether an audit log already listens to this recorder (so it is never hooked twice)."""
    return any(getattr(fn, "__qualname__", "").startswith("AuditLog.listener") for fn in recorder.listeners)


def attach_to_recorders(audit: AuditLog, policies: Iterable[Policy]) -> int:
    """Hook the log into every policy's decision recorder, so decisions are written as they are taken."""
    n = 0
    for policy in policies:
        recorder = policy.decision_recorder()
        if recorder is not None and not audit_listening(recorder):
            recorder.listeners.append(audit.listener())
            n += 1
    return n
