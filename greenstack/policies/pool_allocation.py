"""`carbon.pool` on runs: reserve the projected emissions in a shared pool, settle with the measured amount.

Why reserve first: a team's concurrent runs must not jointly overspend the pool, so each run holds its
projected emissions before (or, without a projection, right after its first epoch) and the pool answers
with the same rules as `greenstack pool request`. At the end the reservation is replaced by what the run
measured. Every decision also goes to the run's audit.jsonl.

Config (a mapping under `carbon.pool`):
    db: pool database (SQLite file path or postgresql:// URL)        required
    participant: team name in the pool                               required
    reserve_kg: projected emissions to reserve before training       default: carbon.budget_kg, else
                                                                     projected after the first epoch
    on_denied: stop | warn                                           default: stop
    zone: zone for alternatives in a denial                          default: carbon.zone
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, GreenstackError, Problem
from greenstack.ledger.audit import AuditLog
from greenstack.ledger.pool import CarbonPool, Decision, alternative_text

log = logging.getLogger("greenstack")


class PoolDenied(GreenstackError):
    """The pool denied the run's reservation (`carbon.pool.on_denied=stop`); same exit code as `pool request`."""

    exit_code = 3

    def __init__(self, decision: Decision) -> None:
        self.decision = decision
        alts = "; ".join(alternative_text(a) for a in decision.alternatives) or "none"
        super().__init__(f"carbon pool denied {decision.requested_kg:g} kg for {decision.participant}: "
                         f"{decision.reason}. Alternatives: {alts}")


@dataclass
class PoolConfig:
    """Validated `carbon.pool` settings."""

    db: str
    participant: str
    reserve_kg: float | None = None
    on_denied: Literal["stop", "warn"] = "stop"
    zone: str | None = None

    @classmethod
    def from_node(cls, node: Any, *, key: str = "carbon.pool") -> PoolConfig | None:
        """Parse a config node (None/empty = no pool); raises ConfigError listing every problem."""
        if node is None or node == {} or node == "":
            return None
        if hasattr(node, "_metadata"):  # OmegaConf DictConfig -> plain dict
            from omegaconf import OmegaConf

            node = OmegaConf.to_container(node, resolve=True)
        if not isinstance(node, Mapping):
            raise ConfigError(Problem(key, node, "must be a mapping with db and participant",
                                      f"{key}={{db: pool.db, participant: my-team}}"))
        keys = {"db", "participant", "reserve_kg", "on_denied", "zone"}
        if set(node) <= keys and all(node.get(k) is None for k in ("db", "participant", "reserve_kg", "zone")) \
                and node.get("on_denied") in (None, "stop"):
            return None  # the config files declare every key with its default: no pool
        problems = []
        unknown = sorted(set(node) - keys)
        if unknown:
            problems.append(Problem(f"{key}.{unknown[0]}", node[unknown[0]], "unknown key",
                                    "keys: db, participant, reserve_kg, on_denied, zone"))
        for required in ("db", "participant"):
            if not node.get(required) or not isinstance(node.get(required), str):
                problems.append(Problem(f"{key}.{required}", node.get(required), "required (a string)"))
        reserve = node.get("reserve_kg")
        if reserve is not None and not (isinstance(reserve, (int, float)) and math.isfinite(reserve) and reserve > 0):
            problems.append(Problem(f"{key}.reserve_kg", reserve, "must be > 0 or null"))
        if node.get("on_denied", "stop") not in ("stop", "warn"):
            problems.append(Problem(f"{key}.on_denied", node.get("on_denied"), "must be stop or warn"))
        if problems:
            raise ConfigError(problems)
        return cls(str(node["db"]), str(node["participant"]), None if reserve is None else float(reserve),
                   node.get("on_denied", "stop"), node.get("zone"))


def _rank0() -> bool:
    return int(os.environ.get("RANK", "0") or 0) == 0


class PoolAllocation(Policy):
    """Holds a run's reservation in a carbon pool; the runner settles it with the measured emissions."""

    role = Role.OBSERVER

    events = frozenset({Event.FIT_START, Event.EPOCH_END, Event.FIT_END, Event.EXCEPTION})

    @classmethod
    def for_run(cls, carbon: Any, *, run_id: str, audit: AuditLog | None = None) -> PoolAllocation | None:
        """The allocation a run's `carbon` config (a CarbonConfig) asks for, or None without `carbon.pool`."""
        config = PoolConfig.from_node(getattr(carbon, "pool", None))
        if config is None:
            return None
        return cls(config, run_id=run_id, audit=audit, budget_kg=getattr(carbon, "budget_kg", None),
                   zone=getattr(carbon, "zone", None))

    def __init__(self, config: PoolConfig, *, run_id: str, audit: AuditLog | None = None,
                 budget_kg: float | None = None, zone: str | None = None, pool: CarbonPool | None = None) -> None:
        super().__init__(name="carbon_pool")
        self.config, self.run_id, self.audit = config, run_id, audit
        self.projected_kg = config.reserve_kg if config.reserve_kg is not None else budget_kg
        self.zone = config.zone or zone
        self.pool = pool or CarbonPool(config.db)
        self.decision: Decision | None = None
        self.allocation_id: int | None = None
        self.settlement: dict[str, Any] | None = None
        self.last_kg: float | None = None

    # -- reserve ----------------------------------------------------------------------------------
    def reserve(self, kg: float) -> Decision:
        """Reserve `kg`; a denial raises PoolDenied (on_denied=stop) or is logged (warn)."""
        decision = self.pool.request(self.config.participant, kg, run_id=self.run_id, zone=self.zone)
        self.decision = decision
        self.allocation_id = decision.allocation_id
        self._audit("allocation", {"pool": _redact(self.config.db), **decision.to_dict()})
        if decision.approved:
            log.info("carbon pool: %s %.4g kg for %s (charged %.4g kg)", decision.status, kg,
                     self.config.participant, decision.charged_kg)
        elif self.config.on_denied == "stop":
            raise PoolDenied(decision)
        else:
            log.warning("carbon pool denied %.4g kg (carbon.pool.on_denied=warn, continuing): %s", kg, decision.reason)
        return decision

    def reserve_before_training(self) -> Decision | None:
        """Called by the runner before the loop starts, so a denied run never spins up the accelerator.

        A resumed run finds its own unsettled reservation in its audit log and keeps it.
        """
        if self.allocation_id is not None or self.decision is not None or not _rank0():
            return None
        if self._resume_from_audit():
            return self.decision
        if self.projected_kg is None:
            return None
        return self.reserve(self.projected_kg)

    def _resume_from_audit(self) -> bool:
        if self.audit is None:
            return False
        open_allocation: dict[str, Any] | None = None
        for record in self.audit.records():
            data = record.get("data") or {}
            if data.get("run_id") != self.run_id or data.get("pool") != _redact(self.config.db):
                continue
            if record.get("kind") == "allocation" and data.get("allocation_id") is not None:
                open_allocation = data
            elif record.get("kind") == "settlement" and open_allocation is not None \
                    and data.get("allocation_id") == open_allocation.get("allocation_id"):
                open_allocation = None
        if open_allocation is None:
            return False
        fields = {k: open_allocation[k] for k in Decision.__dataclass_fields__ if k in open_allocation}
        self.decision = Decision(**fields)
        self.allocation_id = self.decision.allocation_id
        log.info("carbon pool: resumed run keeps allocation %s", self.allocation_id)
        return True

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        kg = state.metrics.get("carbon/total_kg_co2e")
        if isinstance(kg, (int, float)):
            self.last_kg = float(kg)
        if event is Event.EPOCH_END and self.decision is None and state.rank == 0 and state.progress > 0 \
                and self.last_kg is not None:
            projected = self.last_kg / state.progress
            try:
                self.reserve(projected)
            except PoolDenied as e:
                state.request_stop(str(e))

    # -- settle -----------------------------------------------------------------------------------
    def settle(self, measured_kg: float | None) -> dict[str, Any] | None:
        """Replace the reservation by the measured emissions (once)."""
        if self.allocation_id is None or self.settlement is not None or measured_kg is None:
            return None
        self.settlement = self.pool.settle(self.allocation_id, measured_kg)
        self._audit("settlement", {"pool": _redact(self.config.db), **self.settlement})
        return self.settlement

    def close(self) -> None:
        """If the run failed before the runner settled, settle with the last emissions it logged."""
        if self.allocation_id is not None and self.settlement is None and self.last_kg is not None:
            try:
                self.settle(self.last_kg)
            except GreenstackError as e:
                log.warning("carbon pool: could not settle allocation %s: %s", self.allocation_id, e)

    def _audit(self, kind: str, data: dict[str, Any]) -> None:
        if self.audit is not None:
            self.audit.append(kind, data)

    def state_dict(self) -> dict[str, Any]:
        return {"allocation_id": self.allocation_id,
                "decision": self.decision.to_dict() if self.decision is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """A resumed run keeps its reservation instead of reserving twice."""
        self.allocation_id = state.get("allocation_id")
        d = state.get("decision")
        if d:
            fields = {k: d[k] for k in Decision.__dataclass_fields__ if k in d}
            self.decision = Decision(**fields)

    def summary(self) -> dict[str, Any]:
        from greenstack.provenance import Figure

        if self.decision is None:
            return {}
        d = self.decision
        src = f"carbon pool {_redact(self.config.db)}, participant {d.participant}, allocation {d.allocation_id}"
        return {"pool/decision": Figure(d.status, "", "measured", src),
                "pool/reserved_kg": Figure(d.requested_kg, "kgCO2eq", "estimated", f"projected; {src}"),
                "pool/charged_kg": Figure(d.charged_kg, "kgCO2eq", "estimated",
                                          f"reservation x {d.premium_factor:g} premium" if d.status ==
                                          "approved_premium" else f"reservation; {src}")}


def _redact(db: str) -> str:
    from greenstack.ledger.pool import redact

    return redact(db)
