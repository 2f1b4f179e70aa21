"""Carbon-aware submission: plan each job's start window when it is submitted, not on its node.

Why at submit time: a job that sleeps inside its allocation holds (and idles) the GPUs it reserved.
With `scheduler=forecast_window` the Slurm launcher asks the same policy the job would run for its
plan, passes the chosen start to Slurm as `--begin`, and tells the job (environment) that its start
was planned, so the job starts at once when Slurm releases it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from greenstack.engine.groups import target_class
from greenstack.engine.policy import Policy
from greenstack.scheduling.slurm import PLANNED_SAVING_ENV, PLANNED_START_ENV, slurm_begin

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
    request = policy.start_request(None)
    plan = policy.make_plan(now)
    choice = plan.choice
    common = {"expected_mean_g_per_kwh": choice.cost / choice.duration_h,
              "run_now_mean_g_per_kwh": choice.cost_now / choice.duration_h, "source": plan.outlook.source}
    if request is not None:
        return BeginPlan(None, now, 0.0, note=f"start requested ({request})", **common)
    if choice.start_h == 0:
        return BeginPlan(None, now, plan.expected_saving_pct,
                         note="now is the lowest-carbon window before the deadline", **common)
    if plan.expected_saving_pct < policy.min_saving_pct:
        return BeginPlan(None, now, 0.0, note=f"best window saves {plan.expected_saving_pct:.1f} % < "
                                              f"min_saving_pct {policy.min_saving_pct:g}", **common)
    return BeginPlan(slurm_begin(plan.start, now), plan.start, plan.expected_saving_pct,
                     note=f"deadline {plan.deadline:%Y-%m-%dT%H:%MZ}", **common)
