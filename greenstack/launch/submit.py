"""Carbon-aware submission: plan each job's start window when it is submitted, not on its node.

Why at submit time: a job that sleeps inside its allocation holds (and idles) the GPUs it reserved.
With `scheduler=forecast_window` the Slurm launcher asks the same policy the job would run for its
plan (its `StartPlanner`: one copy of the start rules), passes the chosen start to Slurm as `--begin`, and tells the job (environment) that its start
was planned, so the job starts at once when Slurm releases it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from greenstack.engine.groups import target_class
from greenstack.engine.policy import Policy
from greenstack.scheduling.slurm import PLANNED_SAVING_ENV, PLANNED_START_ENV

log = logging.getLogger("greenstack")


@dataclass(frozen=True)
class BeginPlan:
    """A job's planned start: `begin` is the sbatch --begin value, None to start as soon as possible."""

    begin: str | None
    start: datetime
    expected_saving_pct: float
    expected_mean_g_per_kwh: float
    run_now_mean_g_per_kwh: float
    source: str
    note: str

    def sbatch_parameters(self) -> dict[str, str]:
        """additional_parameters for submitit: --begin, and the plan exported into the job's environment."""
        if self.begin is None:
            return {}
        env = (f"ALL,{PLANNED_START_ENV}={self.start.astimezone(timezone.utc).strftime('%Y-%m-%dT%H:%M:%SZ')},"
               f"{PLANNED_SAVING_ENV}={self.expected_saving_pct:.3f}")
        return {"begin": self.begin, "export": env}

    def describe(self) -> str:
        when = f"--begin={self.begin} ({self.start:%Y-%m-%dT%H:%MZ})" if self.begin else "now"
        return (f"start {when}: expected {self.expected_mean_g_per_kwh:.0f} vs {self.run_now_mean_g_per_kwh:.0f} "
                f"gCO2e/kWh now, expected saving {self.expected_saving_pct:.1f} % on {self.source}; {self.note}")


def plan_begin(cfg: Any, now: datetime | None = None) -> BeginPlan | None:
    """The submit-time plan for one job's composed config; None unless its scheduler plans at submit time
    (`Policy.plans_at_submit`: forecast_window, with `slurm: begin` and no start-now request)."""
    node = cfg.get("scheduler") if hasattr(cfg, "get") else None
    cls = target_class(node)
    if cls is None or not issubclass(cls, Policy) or not cls.plans_at_submit:
        return None
    from hydra.utils import instantiate

    policy = instantiate(node)
    if policy.slurm != "begin":
        return None
    now = now or policy.now()
    # the job's own rules (StartPlanner), as decided inside an allocation: a window worth waiting for
    # becomes --begin; anything else starts as soon as Slurm schedules the job
    decision = policy.planner().plan(now, request=policy.start_request(None), in_slurm=True)
    plan = decision.plan or policy.make_plan(now)  # the figures to log, also when asked to start at once
    choice = plan.choice
    common = {"expected_mean_g_per_kwh": choice.cost / choice.duration_h,
              "run_now_mean_g_per_kwh": choice.cost_now / choice.duration_h, "source": plan.outlook.source}
    if decision.action == "slurm_begin":
        return BeginPlan(decision.begin, plan.start, plan.expected_saving_pct,
                         note=f"deadline {plan.deadline:%Y-%m-%dT%H:%MZ}", **common)
    return BeginPlan(None, now, decision.expected_saving_pct or 0.0, note=decision.note, **common)
