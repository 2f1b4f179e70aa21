"""greenstack for training code it does not run: `track`, `wait_for_window` and `TrackedRun`.

Why one `TrackedRun` under all three entry points (`track`, the Hugging Face and Lightning callbacks):
a stretch of user code is metered, priced hour by hour, budgeted, scheduled and reported by the very
objects a greenstack run uses (`Measurement`, the scheduler policies, `write_summary`, the audit log,
`finish_run_report`), so its `sustainability.json`, `emissions.csv`, `audit.jsonl` and `report.html`
are the ones `greenstack train` writes, with the same keys, units and provenance.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import logging
import statistics
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from greenstack.errors import ConfigError, GreenstackError, Problem

log = logging.getLogger("greenstack")
#: the config groups user code is configured by (the same files as `greenstack train`'s)
GROUPS = ("carbon", "energy", "scheduler")
#: schedulers that decide once, before the work starts (pause_resume needs greenstack's own loop)
START_SCHEDULERS = ("immediate", "forecast_window", "threshold", "region")
J_PER_KWH = 3.6e6


class CarbonBudgetExceeded(GreenstackError):
    """Raised inside `track` when `carbon.budget_action=stop` and the emissions exceed `carbon.budget_kg`."""

    exit_code = 3

    def __init__(self, reason: str = "", decision: Mapping[str, Any] | None = None) -> None:
        self.reason = reason
        self.decision = dict(decision or {})
        super().__init__(f"carbon budget exceeded: {reason} (raise carbon.budget_kg, or set "
                         "carbon.budget_action=warn to only warn)")


# -- configuration ----------------------------------------------------------------------------------
def _group_value(group: str, value: Any, selections: dict[str, str], fields: dict[str, dict[str, Any]],
                 where: str, problems: list[Problem]) -> None:
    if value is None:
        return
    if isinstance(value, str):
        selections[group] = value
    elif isinstance(value, Mapping):
        fields[group] = {**fields.get(group, {}), **dict(value)}
    else:
        problems.append(Problem(f"{where}{group}", value, "expected an option name or a mapping of fields",
                                f'e.g. {group}="static" or {group}={{...}}'))


def _read_yaml(path: str | Path, selections: dict[str, str], fields: dict[str, dict[str, Any]],
               meta: dict[str, Any], problems: list[Problem]) -> None:
    p = Path(path)
    if not p.is_file():
        problems.append(Problem("config", str(path), "no such YAML file", "give the path of a YAML file"))
        return
    try:
        data = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    except Exception as e:  # noqa: BLE001 - any parse error is the user's to fix
        problems.append(Problem("config", str(path), f"not valid YAML: {str(e).splitlines()[0]}"))
        return
    if not isinstance(data, dict):
        problems.append(Problem("config", str(path), "must be a mapping of config groups",
                                "e.g. `carbon: static` or `carbon: {zone: GB, budget_kg: 0.5}`"))
        return
    for key, value in data.items():
        if key == "defaults":  # Hydra's defaults-list form: [{carbon: static}, {energy: tdp}]
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, Mapping) and all(k in GROUPS for k in item):
                    selections.update({str(k): str(v) for k, v in item.items()})
                else:
                    problems.append(Problem(f"{p.name}:defaults", item, "not a `group: option` entry",
                                            f"groups: {', '.join(GROUPS)}"))
        elif key in GROUPS:
            _group_value(str(key), value, selections, fields, f"{p.name}:", problems)
        elif key in ("run_name", "project"):
            meta[str(key)] = value
        else:
            problems.append(Problem(f"{p.name}:{key}", value, "not a config group greenstack.track uses",
                                    f"use {', '.join(GROUPS)}, run_name or project"))


def compose_groups(config: str | Path | None = None, *, carbon: str | Mapping[str, Any] | None = None,
                   energy: str | Mapping[str, Any] | None = None, scheduler: str | Mapping[str, Any] | None = None,
                   overrides: Sequence[str] = ()) -> DictConfig:
    """The `carbon`, `energy` and `scheduler` groups of greenstack's config tree, composed and validated.

    A string picks a group option (`carbon="static"`); a mapping sets fields over the option
    (`carbon={"zone": "GB", "budget_kg": 0.1}`); `config` is a YAML file of the same shape (or with a
    Hydra `defaults:` list); `overrides` are Hydra overrides (`"carbon.pue=1.2"`). Keyword arguments win
    over the file. Raises ConfigError listing every problem (the checks `greenstack validate` runs).
    """
    from greenstack.compose import compose_with_problems
    from greenstack.validate import validate_config

    problems: list[Problem] = []
    selections: dict[str, str] = {}
    fields: dict[str, dict[str, Any]] = {}
    meta: dict[str, Any] = {}
    if config is not None:
        _read_yaml(config, selections, fields, meta, problems)
    for group, value in (("carbon", carbon), ("energy", energy), ("scheduler", scheduler)):
        _group_value(group, value, selections, fields, "", problems)
    for group, option in selections.items():
        if group == "scheduler" and option not in START_SCHEDULERS:
            problems.append(Problem("scheduler", option, "not available outside greenstack's training loop",
                                    f"use one of {', '.join(START_SCHEDULERS)}"))
            selections[group] = "immediate"
    cfg, found = compose_with_problems([f"{g}={o}" for g, o in selections.items()] + list(overrides))
    problems += found
    if cfg is None:
        raise ConfigError(problems)
    sub = OmegaConf.masked_copy(cfg, [*GROUPS, "project", "run_name"])
    OmegaConf.set_struct(sub, False)
    for group, values in fields.items():
        sub[group] = OmegaConf.merge(sub[group], values)
    for key, value in meta.items():
        sub[key] = value
    problems += validate_config(sub)
    if problems:
        seen: set[tuple[str, str, str]] = set()
        unique = [p for p in problems if (p.key, str(p.value), p.reason) not in seen
                  and not seen.add((p.key, str(p.value), p.reason))]  # type: ignore[func-returns-value]
        raise ConfigError(unique)
    return sub


# -- the shared run ---------------------------------------------------------------------------------
@dataclass
class _Timer:
    step_times_s: list[float] = field(default_factory=list)
    _t: float | None = None

    def begin(self) -> None:
        self._t = time.perf_counter()

    def end(self) -> None:
        if self._t is not None:
            self.step_times_s.append(time.perf_counter() - self._t)
            self._t = None


class TrackedRun:
    """One measured stretch of user code, written out as a greenstack run dir.

    Lifecycle: `decide_start()` (the scheduler's start decision; may wait), `start()` (meters on),
    `step()` per optimizer step (cheap; budget checked at log steps and at most once per meter
    interval), `finish()` (sustainability.json, emissions.csv, audit.jsonl, report.html).
    """

    def __init__(self, cfg: DictConfig, run_dir: str | Path, *, run_name: str | None = None, model: Any = None,
                 total_steps: int = 0, log_every: int = 10, meters: list[Any] | None = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> None:
        import torch
        from hydra.utils import instantiate

        from greenstack.engine.state import State
        from greenstack.measure import Measurement

        self.cfg = copy.deepcopy(cfg)
        if run_name is not None:
            self.cfg["run_name"] = run_name  # summary's run_name and emissions.csv's experiment_id
        self.run_dir = Path(run_dir)
        self.log_every = max(1, int(log_every))
        self.carbon = instantiate(cfg.carbon)
        self.energy = instantiate(cfg.energy)
        inject = {k: v for k, v in (("clock", clock), ("sleep", sleep)) if v is not None}
        try:
            self.schedulers = [instantiate(cfg.scheduler, **inject)]
        except Exception:  # a scheduler without an injectable clock (region) is built as configured
            self.schedulers = [instantiate(cfg.scheduler)]
        self.measurement = Measurement(self.energy, self.carbon, log_interval=self.log_every, meters=meters,
                                       count_flops=False)
        device = torch.device("cpu")
        if model is not None:
            param = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
            device = param.device if param is not None else device
        self.state = State(model=model if model is not None else torch.nn.Module(), device=device,
                           max_steps=int(total_steps), run_dir=str(self.run_dir))
        self.tokens_seen = 0
        #: the figures of the latest log step (what the callbacks hand to the trainer's loggers)
        self.last_figures: dict[str, float] = {}
        self.last_figures_step = -1
        self.timer = _Timer()
        self.run_id = ""
        self.audit: Any = None
        self.summary: dict[str, Any] | None = None
        self.report: Any = None  # the runner's RunReport: clock, summary and emissions row
        self._jsonl: Any = None
        self._lock = threading.Lock()
        self._decided = False
        self._started = False
        self._last_check = 0.0
        self._last_read = -float("inf")  # the first logging step always reads the meters

    # -- lifecycle ----------------------------------------------------------------------------------
    def decide_start(self) -> None:
        """The scheduler's start decision (waits for the window if it says so), recorded in audit.jsonl."""
        if self._decided:
            return
        from greenstack.engine.audit_trail import attach_to_recorders
        from greenstack.ledger.audit import run_audit_log
        from greenstack.policies.scheduler._base import start_when_scheduled
        from greenstack.tracking.base import load_or_create_run_id

        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.run_id = load_or_create_run_id(self.run_dir)
        self.audit = run_audit_log(self.run_dir, actor=f"run {self.run_id}")
        attach_to_recorders(self.audit, self.schedulers)
        carried = start_when_scheduled(self.schedulers, self.run_dir)
        carried(_event("INIT"), self.state, _reporter(self.state, carried))  # the decision's figures go into the first metrics row
        self._decided = True

    def start(self) -> None:
        """Start the meters (after the start decision)."""
        if self._started:
            return
        self.decide_start()
        from greenstack.report.summary import RunReport
        from greenstack.tracking.base import JsonlWriter

        self._jsonl = JsonlWriter(self.run_dir) if self.state.rank == 0 else None  # one writer per run
        self.report = RunReport(self.cfg, run_dir=self.run_dir, run_id=self.run_id, measurement=self.measurement)
        for policy in self.report.policies():  # the clock, then the meters
            policy(_event("FIT_START"), self.state, _reporter(self.state, policy))
        self._last_check = time.monotonic()
        self._started = True

    def step(self, *, samples: int = 0, tokens: int = 0, steps: int = 1) -> bool:
        """Count one optimizer step (and its samples/tokens); True when the carbon budget asks to stop."""
        st = self.state
        st.step += steps
        st.samples_seen += samples
        self.tokens_seen += tokens
        if steps <= 0:
            return False
        mon = self.measurement.monitor
        logging_step = st.step % self.log_every == 0
        if mon is not None:
            # a reading walks the process tree (milliseconds): at logging steps only, at most once per
            # energy.interval_s (the meters' thread reads in between), and always at the first one, so
            # no logged figure misses the energy of a short run's first steps
            now = time.monotonic()
            read = logging_step and now - self._last_read >= self.energy.interval_s
            mon.sample(read=read)
            if read:
                self._last_read = now
        if logging_step:
            self.last_figures, self.last_figures_step = self.log_row(), st.step
            return self.check_budget()
        if self.carbon.budget_kg is not None and time.monotonic() - self._last_check >= self.energy.interval_s:
            return self.check_budget()
        return False

    def check_budget(self) -> bool:
        """Check `carbon.budget_kg` now; True when `budget_action=stop` and the run must stop."""
        self._last_check = time.monotonic()
        with self._lock:
            return self.measurement.check_budget(self.state, every_step=True)

    def figures(self) -> dict[str, float]:
        """Running figures (energy, carbon, cost, J/sample, J/token) for the trainer's loggers."""
        with self._lock:
            out = self.measurement._running(self.state)
        if self.tokens_seen and "energy/total_kwh" in out:
            out["energy/j_per_token"] = out["energy/total_kwh"] * J_PER_KWH / self.tokens_seen
        if "carbon/projected_total_kg" in self.state.metrics:
            out["carbon/projected_total_kg"] = self.state.metrics["carbon/projected_total_kg"]
        return out

    def log_row(self, extra: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Write one metrics.jsonl row (the report's power and emissions plots read it); returns the figures."""
        figures = self.figures()
        row = {**self.state.metrics, **figures, **(extra or {})}
        self.state.metrics.clear()
        if self._jsonl is not None:
            with self._lock:
                self._jsonl.log(row, self.state.step)
        return figures

    def finish(self, *, error: BaseException | None = None, figures: Mapping[str, Any] | None = None
               ) -> dict[str, Any]:
        """Write the run's files and return the summary (with `flat` figures); `figures`: the work's own
        figures (`Figure`s, e.g. a prepare job's token count) to report with the measured ones.

        After an error the summary is the runner's partial one (`status` failed/interrupted, `partial`);
        a budget stop is `budget_stopped` with the reason in `stopped_early`. Same order as the runner's
        end: summary, budget decision, report.html, policy decisions, the audit head anchored.
        """
        if self.summary is not None:
            return self.summary
        from greenstack.engine.audit_trail import record_policy_decisions
        from greenstack.ledger.audit import anchor_run
        from greenstack.provenance import Figure
        from greenstack.report.html import finish_run_report

        if not self._started:
            self.start()
        self.log_row()
        st = self.state
        report = self.report
        report.clock(_event("FIT_END"), st, _reporter(st, report.clock))
        times = self.timer.step_times_s
        own: dict[str, Figure] = {
            "time/median_step_s": Figure(statistics.median(times) if times else None, "s", "measured",
                                         "time.perf_counter per optimizer step"),
            **(figures or {}),
        }
        n_params = sum(p.numel() for p in st.model.parameters())
        if n_params:
            own["model/parameters"] = Figure(n_params, "count", "measured", "sum of parameter numel")
        try:
            if error is None:
                summary = report.complete(st, own, self.schedulers)
                self._add_tokens(summary)
                if self.measurement.budget_decision is not None:
                    self.audit.append("budget", self.measurement.budget_decision)
                finish_run_report(self.run_dir)  # report.html + plots/; never fails the run
            else:
                from greenstack.runner import end_status

                reason = (str(error) or type(error).__name__).splitlines()[0]
                summary = report.finish_partial(st, status=end_status(error), reason=reason,
                                                policies=self.schedulers) or {}
        finally:
            record_policy_decisions(self.audit, self.schedulers)
            try:
                anchor_run(self.run_dir, self.audit)
            except Exception as e:  # noqa: BLE001 - never mask the run's own outcome
                log.warning("could not anchor the audit log's head: %s", e)
            report.close()
            if self._jsonl is not None:
                self._jsonl.close()
                self._jsonl = None
        self.summary = summary
        return summary

    def _add_tokens(self, summary: dict[str, Any]) -> None:
        """energy/j_per_token (the runner's loop counts samples only) into the written summary."""
        from greenstack.io import atomic_write_json
        from greenstack.provenance import Figure

        energy = summary["metrics"].get("energy/total_kwh", {})
        if not self.tokens_seen or not isinstance(energy.get("value"), (int, float)):
            return
        fig = Figure(energy["value"] * J_PER_KWH / self.tokens_seen, "J/token", energy["provenance"],
                     f"energy/total_kwh / {self.tokens_seen} training tokens")
        summary["metrics"]["energy/j_per_token"] = fig.to_dict()
        summary["flat"]["energy/j_per_token"] = fig.value
        if self.state.rank == 0:
            atomic_write_json(self.run_dir / "sustainability.json", {k: v for k, v in summary.items() if k != "flat"})


def _event(name: str) -> Any:
    from greenstack.engine.events import Event

    return Event[name]


def _reporter(state: Any, policy: Any) -> Any:
    """The reporter of a hook this module calls itself (no Trainer here): metrics go to `state.metrics`."""
    from greenstack.engine.reporter import Reporter

    return Reporter.for_state(state, getattr(policy, "name", type(policy).__name__))


# -- track ------------------------------------------------------------------------------------------
class track:  # noqa: N801 - used like a function: `with greenstack.track(...)`
    """Measure a block or function like a greenstack run, and write its run dir at exit.

    `with greenstack.track("runs/exp1", carbon={"zone": "GB", "budget_kg": 0.5}) as run:` ... and
    optionally `run.step(samples=n)` per step (J/sample, step-aligned metrics, budget checks). With
    `carbon.budget_action=stop` an exceeded budget raises `CarbonBudgetExceeded` in the tracked thread
    (at the next `step()`, or from the watchdog that checks once per meter interval), after which the
    files are written with the reason in `stopped_early`. Also a decorator: `@greenstack.track("runs/x")`.
    `log_every`: a metrics.jsonl row (and a budget check) every N steps; the budget is also checked at
    most once per meter interval in between.
    """

    def __init__(self, run_dir: str | Path = "greenstack-run", *, config: str | Path | None = None,
                 carbon: str | Mapping[str, Any] | None = None, energy: str | Mapping[str, Any] | None = None,
                 scheduler: str | Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
                 run_name: str | None = None, log_every: int = 10, meters: list[Any] | None = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> None:
        self.cfg = compose_groups(config, carbon=carbon, energy=energy, scheduler=scheduler, overrides=overrides)
        self.run_dir = Path(run_dir)
        self._kw = {"run_name": run_name, "log_every": log_every, "meters": meters, "clock": clock, "sleep": sleep}
        self.run: TrackedRun | None = None
        self._watchdog: threading.Thread | None = None
        self._done = threading.Event()
        self._guard = threading.Lock()
        self._target: int | None = None
        self._raised: CarbonBudgetExceeded | None = None

    def __call__(self, func: Callable[..., Any]) -> Callable[..., Any]:  # type: ignore[override]
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self._recreate():
                return func(*args, **kwargs)

        return wrapper

    def _recreate(self) -> track:
        fresh = object.__new__(type(self))
        fresh.__dict__.update(self.__dict__)
        fresh.run, fresh._watchdog, fresh._raised, fresh._target = None, None, None, None
        fresh._done, fresh._guard = threading.Event(), threading.Lock()
        return fresh

    def __enter__(self) -> TrackedRun:
        self.run = TrackedRun(self.cfg, self.run_dir, **self._kw)  # type: ignore[arg-type]
        self.run.start()
        if self.run.carbon.budget_kg is not None and self.run.carbon.budget_action == "stop":
            self._target = threading.get_ident()
            self._watchdog = threading.Thread(target=self._watch, name="greenstack-budget", daemon=True)
            self._watchdog.start()
        return _Handle(self)  # type: ignore[return-value]

    def _watch(self) -> None:
        """Check the budget once per meter interval; on a breach raise CarbonBudgetExceeded in the tracked
        thread (delivered at its next Python bytecode: a long C call finishes first)."""
        run = self.run
        assert run is not None
        while not self._done.wait(run.energy.interval_s):
            if run.check_budget():
                with self._guard:
                    if self._done.is_set():
                        return
                    self._raised = CarbonBudgetExceeded(run.state.stop_reason, run.measurement.budget_decision)
                    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target),
                                                               ctypes.py_object(CarbonBudgetExceeded))
                return

    def _stop_watchdog(self, delivered: bool) -> None:
        with self._guard:
            self._done.set()
            if self._raised is not None and not delivered:  # the block ended first: drop the pending raise
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._target), None)
        if self._watchdog is not None:
            self._watchdog.join()

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        budget_stop = exc_type is not None and issubclass(exc_type, CarbonBudgetExceeded)
        self._stop_watchdog(delivered=budget_stop)
        run = self.run
        assert run is not None
        run.finish(error=None if budget_stop else exc)
        if budget_stop and self._raised is not None and not getattr(exc, "reason", ""):
            raise self._raised from None  # the watchdog raised the bare class: raise it with its reason
        return False


class _Handle:
    """What `with greenstack.track(...) as run` gives: `step()`, `figures()`, `summary` and the run dir."""

    def __init__(self, owner: track) -> None:
        self._owner = owner
        self._run = owner.run

    @property
    def run_dir(self) -> Path:
        return self._run.run_dir  # type: ignore[union-attr]

    @property
    def summary(self) -> dict[str, Any] | None:
        return self._run.summary  # type: ignore[union-attr]

    def step(self, samples: int = 0, tokens: int = 0) -> None:
        """Count one step; raises CarbonBudgetExceeded when `budget_action=stop` and the budget is spent."""
        run = self._run
        assert run is not None
        run.timer.end()
        if run.step(samples=samples, tokens=tokens) or run.state.stop:
            raise CarbonBudgetExceeded(run.state.stop_reason, run.measurement.budget_decision)
        run.timer.begin()

    def figures(self) -> dict[str, float]:
        return self._run.figures()  # type: ignore[union-attr]


# -- wait_for_window --------------------------------------------------------------------------------
@dataclass(frozen=True)
class StartDecision:
    """What `wait_for_window` decided: when the job may start, how long it waited, the expected saving."""

    action: str
    start: datetime
    waited_s: float
    expected_saving_pct: float | None
    decisions: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"action": self.action, "start": self.start.isoformat(), "waited_s": round(self.waited_s, 3),
                "expected_saving_pct": self.expected_saving_pct, "decisions": self.decisions}


def wait_for_window(*, duration: str | float = "1h", deadline: str | float = "24h", zone: str | None = None,
                    trace: str | None = None, carbon: str | Mapping[str, Any] | None = None,
                    objective: str | float = "mean", min_saving_pct: float = 0.0, start_now: bool = False,
                    run_dir: str | Path | None = None, audit: str | Path | None = None,
                    tick_s: float = 1.0, countdown_every_s: float = 60.0,
                    clock: Callable[[], float] | None = None,
                    sleep: Callable[[float], None] | None = None) -> StartDecision:
    """Block until the lowest-carbon window of `duration` that ends by `deadline` begins, then return.

    The decision is `scheduler=forecast_window`'s (the same policy, rules and start-now routes:
    SIGUSR2, GREENSTACK_START_NOW=1, `touch RUN_DIR/START_NOW`, `start_now=True`). Plans on `zone`
    (a shipped zone), `trace` (your CSV), or `carbon` (a carbon group option/fields) - default the
    carbon group's default. `audit`: append the decisions to this hash-chained log.
    """
    from greenstack.engine.audit_trail import attach_to_recorders
    from greenstack.ledger.audit import AuditLog
    from greenstack.policies.scheduler.forecast_window import ForecastWindow

    carbon_cfg = None
    if zone is None and trace is None:
        from hydra.utils import instantiate

        carbon_cfg = instantiate(compose_groups(carbon=carbon).carbon)
    policy = ForecastWindow(duration=duration, deadline=deadline, objective=objective, min_saving_pct=min_saving_pct,
                            start_now=start_now, zone=zone, trace=trace, carbon=carbon_cfg, tick_s=tick_s,
                            countdown_every_s=countdown_every_s, clock=clock, sleep=sleep)
    if audit is not None:
        attach_to_recorders(AuditLog(audit, actor="wait_for_window"), [policy])
    policy.decide_start(run_dir)
    last = policy.decisions[-1]
    saving = next((d["expected_saving_pct"] for d in reversed(policy.decisions)
                   if isinstance(d.get("expected_saving_pct"), (int, float))), None)
    return StartDecision(action=str(last["action"]), start=policy.now(), waited_s=policy.waited_s,
                         expected_saving_pct=saving, decisions=list(policy.decisions))
