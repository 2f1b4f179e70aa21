"""Carbon-budgeted multi-objective search (carbon-aware NAS): accuracy vs measured kgCO2e.

Why our own loop rather than hydra-optuna-sweeper: that plugin pins optuna 2.x and cannot see what
a trial *emitted*. Here every trial is a normal greenstack job (any launcher, Slurm included); its
measured `carbon/total_kg_co2e` is charged to the sweep's budget; a trial over the per-trial budget
is rejected (or penalised); the sweep stops once `stop_fraction` (90 %) of the total budget is
spent; the result is the Pareto front of accuracy against emissions. Optuna (in-memory storage,
NSGA-II by default) only proposes the next architectures/hyper-parameters.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from greenstack.errors import ConfigError, Problem
from greenstack.io import dumps
from greenstack.launch import jobs as jobtable

log = logging.getLogger("greenstack")
OVER_BUDGET = ("reject", "penalize")


# -- search space ----------------------------------------------------------------------------------
def parse_search_space(params: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna distributions from Hydra sweep syntax: `choice(a,b)`, `range(1,5)`, `interval(0.1,1)`,
    `tag(log, interval(1e-4,1e-2))` (a plain list is a choice). Raises ConfigError listing every bad key."""
    import optuna.distributions as d
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    parser = OverridesParser.create()
    space: dict[str, Any] = {}
    problems: list[Problem] = []
    for key, raw in params.items():
        text = f"choice({', '.join(str(v) for v in raw)})" if isinstance(raw, (list, tuple)) else str(raw)
        where = f"hydra.sweeper.params.{key}"
        try:
            value = parser.parse_override(f"{key}={text}").value()
        except Exception as e:  # noqa: BLE001 - Hydra's grammar errors, reported per key
            problems.append(Problem(where, text, f"not a sweep expression: {str(e).splitlines()[0]}",
                                    "use choice(a,b), range(1,5), interval(0.1,1.0) or tag(log, interval(...))"))
            continue
        if isinstance(value, ChoiceSweep):
            space[key] = d.CategoricalDistribution(list(value.list))
        elif isinstance(value, RangeSweep):
            start, stop, step = value.start, value.stop, value.step
            if all(isinstance(v, int) for v in (start, stop, step)):
                space[key] = d.IntDistribution(int(start), int(stop) - 1, step=int(step))
            else:
                space[key] = d.CategoricalDistribution([start + i * step for i in range(math.ceil((stop - start) / step))])
        elif isinstance(value, IntervalSweep):
            log_scale = "log" in value.tags
            if isinstance(value.start, int) and isinstance(value.end, int):
                space[key] = d.IntDistribution(value.start, value.end, log=log_scale)
            else:
                space[key] = d.FloatDistribution(float(value.start), float(value.end), log=log_scale)
        else:
            problems.append(Problem(where, text, "a fixed value, not a search dimension",
                                    "put fixed values in the recipe; search with choice/range/interval"))
    if problems:
        raise ConfigError(problems)
    if not space:
        raise ConfigError(Problem("hydra.sweeper.params", dict(params), "empty search space",
                                  "e.g. hydra.sweeper.params={model.kwargs.depth: 'choice(1,2,4)'}"))
    return space


# -- budget and Pareto front --------------------------------------------------------------------------
@dataclass
class BudgetLedger:
    """Measured emissions charged to a sweep, and when it must stop."""

    total_kg: float
    trial_kg: float | None = None
    stop_fraction: float = 0.9
    spent_kg: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if not self.total_kg > 0:
            problems.append(Problem("hydra.sweeper.total_budget_kg", self.total_kg, "must be > 0"))
        if self.trial_kg is not None and not self.trial_kg > 0:
            problems.append(Problem("hydra.sweeper.trial_budget_kg", self.trial_kg, "must be > 0 (or null)"))
        if not 0 < self.stop_fraction <= 1:
            problems.append(Problem("hydra.sweeper.stop_fraction", self.stop_fraction, "must be in (0, 1]"))
        if problems:
            raise ConfigError(problems)

    def charge(self, kg: float) -> None:
        self.spent_kg += max(0.0, float(kg))

    @property
    def stop_kg(self) -> float:
        return self.stop_fraction * self.total_kg

    def exhausted(self) -> bool:
        """True once `stop_fraction` of the total budget is spent: no further trial is started."""
        return self.spent_kg >= self.stop_kg

    def over_trial_budget(self, kg: float) -> bool:
        return self.trial_kg is not None and kg > self.trial_kg


def penalised(accuracy: float, kg: float, trial_kg: float, penalty: float) -> float:
    """Accuracy minus `penalty` per budget-multiple over the per-trial budget (unchanged within it)."""
    return accuracy - penalty * max(0.0, kg / trial_kg - 1.0)


def pareto_front(points: Sequence[tuple[int, float, float]]) -> list[int]:
    """Ids of the (id, accuracy↑, kg↓) points no other point dominates, sorted by kg."""
    front = [p for p in points
             if not any(q[1] >= p[1] and q[2] <= p[2] and (q[1] > p[1] or q[2] < p[2]) for q in points)]
    return [p[0] for p in sorted(front, key=lambda p: (p[2], -p[1]))]


# -- the sweep ---------------------------------------------------------------------------------------
@dataclass
class TrialResult:
    number: int
    params: dict[str, Any]
    state: str  # complete | rejected (over the per-trial budget) | failed
    accuracy: float | None = None
    objective: float | None = None  # the accuracy the study was told (penalised when over budget)
    kg: float | None = None
    run_dir: str | None = None
    note: str = ""


@dataclass
class SweepSettings:
    n_trials: int = 20
    batch_size: int = 1
    total_budget_kg: float = 0.01
    trial_budget_kg: float | None = None
    stop_fraction: float = 0.9
    over_budget: str = "reject"
    penalty: float = 0.5
    metric: str = "test/accuracy"
    sampler: str = "nsga2"
    seed: int = 0
    params: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        problems = []
        if self.n_trials < 1:
            problems.append(Problem("hydra.sweeper.n_trials", self.n_trials, "must be >= 1"))
        if self.batch_size < 1:
            problems.append(Problem("hydra.sweeper.batch_size", self.batch_size, "must be >= 1"))
        if self.over_budget not in OVER_BUDGET:
            problems.append(Problem("hydra.sweeper.over_budget", self.over_budget, "must be reject or penalize",
                                    "reject: excluded from the Pareto front; penalize: accuracy lowered"))
        if self.sampler not in ("nsga2", "tpe", "random"):
            problems.append(Problem("hydra.sweeper.sampler", self.sampler, "must be nsga2, tpe or random"))
        if problems:
            raise ConfigError(problems)


def _sampler(name: str, seed: int) -> Any:
    import optuna

    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=4)


def _value(text: Any) -> str:
    return str(text).lower() if isinstance(text, bool) else str(text)


def run_search(settings: SweepSettings, fixed_overrides: Sequence[str],
               launch: Callable[[list[list[str]], int], Sequence[Any]], *, sweep_dir: str | Path | None = None,
               run_dir_of: Callable[[int], str | None] | None = None) -> dict[str, Any]:
    """Propose, launch and charge trials until `n_trials` or the budget; returns the report (also
    written to SWEEP_DIR/carbon_sweep.json). `launch(overrides_per_job, first_job_idx)` returns Hydra
    JobReturns (or anything with `.status` and `.return_value`)."""
    import optuna
    from hydra.core.utils import JobStatus

    settings.check()
    space = parse_search_space(settings.params)
    ledger = BudgetLedger(settings.total_budget_kg, settings.trial_budget_kg, settings.stop_fraction)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=_sampler(settings.sampler, settings.seed))
    results: list[TrialResult] = []
    stop_reason = f"n_trials={settings.n_trials} reached"
    while len(results) < settings.n_trials:
        if ledger.exhausted():
            stop_reason = (f"{ledger.spent_kg:.3g} kgCO2e spent >= {settings.stop_fraction:.0%} of the "
                           f"{ledger.total_kg:.3g} kg budget")
            break
        trials = [study.ask(space) for _ in range(min(settings.batch_size, settings.n_trials - len(results)))]
        overrides = [[*fixed_overrides, *(f"{k}={_value(v)}" for k, v in t.params.items())] for t in trials]
        first = len(results)
        returns = launch(overrides, first)
        for offset, (trial, ret) in enumerate(zip(trials, returns, strict=True)):
            run_dir = run_dir_of(first + offset) if run_dir_of else None
            results.append(_tell(study, trial, ret, ledger, settings, run_dir, JobStatus.COMPLETED))
        log.info("carbon sweep: %d trials, %.3g of %.3g kgCO2e spent (stop at %.3g)", len(results),
                 ledger.spent_kg, ledger.total_kg, ledger.stop_kg)
    front = pareto_front([(r.number, r.objective, r.kg) for r in results
                          if r.state == "complete" and r.objective is not None and r.kg is not None])
    report = {"metric": settings.metric, "n_trials": len(results), "stopped": stop_reason,
              "spent_kg": ledger.spent_kg, "total_budget_kg": ledger.total_kg, "stop_kg": ledger.stop_kg,
              "trial_budget_kg": ledger.trial_kg, "over_budget": settings.over_budget,
              "pareto_front": front, "trials": [asdict(r) for r in results]}
    if sweep_dir is not None:
        Path(sweep_dir).mkdir(parents=True, exist_ok=True)
        (Path(sweep_dir) / "carbon_sweep.json").write_text(dumps(report, indent=2, default=str) + "\n")
    print_report(report)
    return report


def _tell(study: Any, trial: Any, ret: Any, ledger: BudgetLedger, settings: SweepSettings, run_dir: str | None,
          completed: Any) -> TrialResult:
    import optuna

    result = TrialResult(trial.number, dict(trial.params), "failed", run_dir=run_dir)
    summary = ret.return_value if ret.status is completed else None
    metric_kg = _metric_and_kg(summary, settings.metric) if summary is not None else (None, None)
    if summary is None:
        metric_kg = _metric_and_kg(_read_summary(run_dir), settings.metric)  # a failed job may have measured some
        if metric_kg[1] is not None:
            ledger.charge(metric_kg[1])
        result.kg = metric_kg[1]
        result.note = "job failed"
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return result
    accuracy, kg = metric_kg
    result.accuracy, result.kg = accuracy, kg
    if kg is None or accuracy is None:
        result.note = f"no {settings.metric if accuracy is None else 'carbon/total_kg_co2e'} in the run summary"
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        return result
    ledger.charge(kg)
    objective = accuracy
    if ledger.over_trial_budget(kg):
        assert ledger.trial_kg is not None
        if settings.over_budget == "reject":
            result.state, result.note = "rejected", f"{kg:.3g} kg > per-trial budget {ledger.trial_kg:.3g} kg"
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return result
        objective = penalised(accuracy, kg, ledger.trial_kg, settings.penalty)
        result.note = f"over the per-trial budget: accuracy penalised to {objective:.4g}"
    result.state, result.objective = "complete", objective
    study.tell(trial, [objective, kg])
    return result


def _metric_and_kg(summary: Any, metric: str) -> tuple[float | None, float | None]:
    return jobtable.figure_value(summary, metric), jobtable.figure_value(summary, jobtable.EMISSIONS_KEY)


def _read_summary(run_dir: str | None) -> Any:
    path = Path(run_dir) / "sustainability.json" if run_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def print_report(report: dict[str, Any]) -> None:
    """The Pareto front (and every trial) as a table on stdout."""
    from rich.table import Table

    from greenstack.console import make_console

    front = set(report["pareto_front"])
    table = Table(title=f"carbon sweep: {report['n_trials']} trials, {report['spent_kg']:.3g} of "
                        f"{report['total_budget_kg']:.3g} kgCO2e spent; stopped: {report['stopped']}",
                  title_justify="left", caption="* = on the Pareto front (accuracy vs kgCO2e)", caption_justify="left")
    for col in ("trial", "pareto", "state", report["metric"], "kgCO2e", "params", "note"):
        table.add_column(col, overflow="fold")
    for t in report["trials"]:
        acc = f"{t['accuracy']:.4g}" if t["accuracy"] is not None else "-"
        kg = f"{t['kg']:.3g}" if t["kg"] is not None else "-"
        params = " ".join(f"{k}={v}" for k, v in t["params"].items())
        table.add_row(str(t["number"]), "*" if t["number"] in front else "", t["state"], acc, kg, params, t["note"])
    make_console(soft_wrap=True, min_width=200).print(table)
