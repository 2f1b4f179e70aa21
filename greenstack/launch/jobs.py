"""The job table printed after a multirun: state, metric, emissions and the log of each job.

Why: Hydra's launchers report a failed job as one exception (or, with submitit, not at all until
you read its pickle), so a sweep of 50 jobs can look fine while three failed. Every launcher path
records one `JobOutcome` per job into the sweep's `JobTable` (opened by the CLI with `collecting()`
for one invocation and dropped with it); the CLI prints them after the sweep and exits non-zero,
naming each failed job's log, when any failed.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: metrics shown in the table, first present wins (accuracy-like before loss-like)
METRIC_KEYS = ("test/accuracy", "val/accuracy", "test/loss", "val/loss", "train/loss")
EMISSIONS_KEY = "carbon/total_kg_co2e"
OK_STATES = frozenset({"COMPLETED"})


@dataclass
class JobOutcome:
    """What became of one job of a sweep."""

    num: int
    overrides: list[str]
    state: str  # COMPLETED, FAILED, CANCELLED, TIMEOUT, PREEMPTED, ... (Slurm's names)
    run_dir: str | None = None
    log_path: str | None = None
    job_id: str | None = None
    metric: tuple[str, float] | None = None
    emissions_kg: float | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return self.state not in OK_STATES


class JobTable:
    """The outcomes of one sweep (one `greenstack train -m` invocation), by job number."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # Hydra's launchers may collect jobs from threads
        self._by_num: dict[int, JobOutcome] = {}

    def record(self, outcome: JobOutcome) -> None:
        with self._lock:
            self._by_num[outcome.num] = outcome  # a requeued job's later outcome replaces its first

    def outcomes(self) -> list[JobOutcome]:
        with self._lock:
            return sorted(self._by_num.values(), key=lambda o: o.num)


#: the table of the sweep being launched; set only inside `collecting()` (Hydra sits between the CLI
#: and the launchers that record, so the table cannot be passed as an argument), reset when it ends
_CURRENT: ContextVar[JobTable | None] = ContextVar("greenstack_job_table", default=None)


@contextmanager
def collecting() -> Iterator[JobTable]:
    """A fresh table that the launchers of the sweep run inside this block record into."""
    table = JobTable()
    token = _CURRENT.set(table)
    try:
        yield table
    finally:
        _CURRENT.reset(token)


def record(outcome: JobOutcome) -> None:
    """Record into the current sweep's table (nothing to do outside `collecting()`: nobody prints it)."""
    table = _CURRENT.get()
    if table is not None:
        table.record(outcome)


def figure_value(summary: Any, key: str) -> float | None:
    """A numeric figure of a run summary (`runner.run`'s return or sustainability.json), or None."""
    metrics = (summary.get("metrics") or {}) if isinstance(summary, dict) else {}
    fig = metrics.get(key)
    raw = fig.get("value") if isinstance(fig, dict) else None
    return float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else None


def figures_from_summary(summary: Any) -> tuple[tuple[str, float] | None, float | None]:
    """(metric name and value, kg CO2e) from a run summary (`runner.run`'s return) or sustainability.json."""
    if not isinstance(summary, dict):
        return None, None
    metric = next(((k, v) for k in METRIC_KEYS if (v := figure_value(summary, k)) is not None), None)
    return metric, figure_value(summary, EMISSIONS_KEY)


def figures_from_run_dir(run_dir: str | Path | None) -> tuple[tuple[str, float] | None, float | None]:
    """The same figures read back from a run dir's sustainability.json (None when the run wrote none)."""
    path = Path(run_dir) / "sustainability.json" if run_dir else None
    if path is None or not path.is_file():
        return None, None
    try:
        return figures_from_summary(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None, None


def print_table(items: list[JobOutcome], *, title: str = "greenstack sweep") -> None:
    """The table of jobs (stdout) and, for each failed job, where to look (stderr)."""
    from rich.console import Console
    from rich.table import Table

    from greenstack.console import make_console, plural

    failed = [o for o in items if o.failed]
    table = Table(title=f"{title}: {plural(len(items), 'job')}, {len(failed)} failed", title_justify="left")
    for col in ("#", "state", "metric", "kgCO2e", "overrides", "log"):
        table.add_column(col, overflow="fold")
    colours = {"COMPLETED": "green", "FAILED": "red", "CANCELLED": "yellow", "TIMEOUT": "red"}
    for o in items:
        metric = f"{o.metric[0]}={o.metric[1]:.4g}" if o.metric else "-"
        kg = f"{o.emissions_kg:.3g}" if o.emissions_kg is not None else "-"
        state = f"[{colours.get(o.state.split()[0], 'red')}]{o.state}[/]"
        table.add_row(str(o.num), state, metric, kg, " ".join(o.overrides), o.log_path or o.run_dir or "")
    make_console(soft_wrap=True, min_width=200).print(table)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for o in failed:
        where = o.log_path or o.run_dir or "(no log)"
        reason = f": {o.error.strip().splitlines()[-1]}" if o.error and o.error.strip() else ""
        err.print(f"[bold red]job {o.num} {o.state}[/]{reason}; see its log: {where}")
