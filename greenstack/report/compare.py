"""Compare runs (a multirun sweep or any run dirs): one table and an accuracy-vs-emissions Pareto plot.

Why Pareto: a sweep rarely has one best run; the useful answer is which runs no other run beats on both
accuracy and emissions, so a team can pick the cheapest run that is good enough. Every value comes from
the runs' own sustainability.json (measured or labelled), never from assumptions.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from greenstack.console import plural
from greenstack.errors import ConfigError, Problem
from greenstack.report.tco import RunDir, load_run

DEFAULT_METRIC = "test/accuracy"
DEFAULT_COST = "carbon/total_kg_co2e"


def _is_job_dir(path: Path) -> bool:
    """A run dir whether or not it finished: its sustainability.json, or Hydra's record of the job."""
    return (path / "sustainability.json").is_file() or (path / ".hydra" / "config.yaml").is_file()


def find_runs(paths: list[str | Path], *, max_depth: int = 3) -> list[Path]:
    """Run dirs under each path: the path itself if it holds sustainability.json, else the runs below it
    (a multirun's numbered job dirs sort numerically), failed jobs (a `.hydra` record without
    sustainability.json) included so a comparison never drops them silently."""
    found: list[Path] = []
    problems = []

    def key(p: Path) -> tuple:
        return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in p.parts)

    for raw in paths:
        root = Path(raw)
        if not root.is_dir():
            problems.append(Problem("DIR", str(root), "not a directory"))
            continue
        if (root / "sustainability.json").is_file():
            found.append(root)
            continue
        below: list[Path] = []
        for depth in range(1, max_depth + 1):  # the shallowest level with runs: a sweep's job dirs
            level = [p for p in root.glob("*/" * depth) if p.is_dir() and _is_job_dir(p)]
            if any((p / "sustainability.json").is_file() for p in level):
                below = level
                break
            below = below or level  # a sweep whose every job failed still lists them
        if not below and _is_job_dir(root):
            below = [root]  # one failed run
        if not below:
            problems.append(Problem("DIR", str(root), "no finished runs (sustainability.json) in or below it",
                                    "give run dirs or a multirun dir (multirun/<date>/<time>)"))
        found.extend(sorted(below, key=key))
    if problems:
        raise ConfigError(problems)
    seen, unique = set(), []
    for p in found:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            unique.append(p)
    return unique


@dataclass
class Row:
    """One run in the comparison."""

    label: str
    path: str
    overrides: list[str]
    metric: float | None
    cost: float | None
    values: dict[str, float | None]
    provenance: dict[str, str]
    pareto: bool = False
    #: completed, or how the run ended otherwise (failed, interrupted, budget_stopped: partial figures)
    state: str = "completed"


@dataclass
class Comparison:
    metric: str
    cost: str
    rows: list[Row]
    plot: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": "greenstack.compare/1", "metric": self.metric, "cost": self.cost, "plot": self.plot,
                "pareto": [r.label for r in self.rows if r.pareto], "notes": self.notes,
                "runs": [r.__dict__ for r in self.rows]}


def pareto_front(points: list[tuple[float, float]]) -> list[bool]:
    """For (cost, metric) points, whether each is Pareto-optimal: no other point has cost <= and metric >=
    with one of them strictly better."""
    flags = []
    for i, (c, m) in enumerate(points):
        dominated = any((c2 <= c and m2 >= m) and (c2 < c or m2 > m) for j, (c2, m2) in enumerate(points) if j != i)
        flags.append(not dominated)
    return flags


def _label(run: RunDir, root_common: Path | None) -> str:
    if root_common is not None:
        try:
            rel = run.path.resolve().relative_to(root_common)
            if str(rel) != ".":
                return str(rel)
        except ValueError:
            pass
    return run.name


def compare_runs(paths: list[str | Path], *, metric: str = DEFAULT_METRIC, cost: str = DEFAULT_COST) -> Comparison:
    """Load the runs and mark the Pareto-optimal ones (maximise `metric`, minimise `cost`)."""
    dirs = find_runs(paths)
    failed = [d for d in dirs if not (d / "sustainability.json").is_file()]
    runs = [load_run(d) for d in dirs if d not in failed]
    every = [r.path for r in runs] + failed
    common = Path(os.path.commonpath([str(p.resolve()) for p in every])) if len(every) > 1 else None
    keys = (metric, cost, "carbon/total_kg_co2e", "energy/total_kwh", "time/duration_s", "cost/energy_usd")
    rows = []
    notes = []
    for run in runs:
        m = run.value(metric)
        if m is None and metric == DEFAULT_METRIC and run.value("val/accuracy") is not None:
            m = run.value("val/accuracy")
            notes.append(f"{run.path}: no {metric}, used val/accuracy")
        values = {k: run.value(k) for k in dict.fromkeys(keys)}
        prov = {k: str((run.figure(k) or {}).get("provenance", "")) for k in values}
        state = str(run.summary.get("status") or "completed")
        rows.append(Row(_label(run, common), str(run.path), run.overrides, m, run.value(cost), values, prov,
                        state=state))
    for path in failed:
        label = _label(RunDir(path, {}, [], {}, [], []), common)
        rows.append(Row(label, str(path), _overrides(path), None, None, dict.fromkeys(keys), {}, state="failed"))
        log_hint = next((str(p) for p in sorted(path.glob("*.log"))), None)
        notes.append(f"{path}: failed before writing sustainability.json" + (f" (see {log_hint})" if log_hint else ""))
    complete = [r for r in rows if r.state == "completed" and r.metric is not None and r.cost is not None
                and math.isfinite(r.metric) and math.isfinite(r.cost)]
    for r in rows:
        if r not in complete:
            why = f"ended {r.state}" if r.state != "completed" else f"lacks {metric} or {cost}"
            notes.append(f"{r.path}: {why}; left out of the Pareto front")
    for r, flag in zip(complete, pareto_front([(r.cost, r.metric) for r in complete]), strict=True):  # type: ignore[misc]
        r.pareto = flag
    rows.sort(key=lambda r: (r.cost is None, r.cost if r.cost is not None else 0.0))
    return Comparison(metric, cost, rows, notes=notes)


def _overrides(path: Path) -> list[str]:
    """The job's command-line overrides (Hydra's record), [] when unreadable."""
    try:
        from omegaconf import OmegaConf

        return [str(o) for o in OmegaConf.to_container(OmegaConf.load(path / ".hydra" / "overrides.yaml")) or []]
    except Exception:  # noqa: BLE001 - a label only
        return []


def plot_pareto(comparison: Comparison, out: str | Path) -> Path:
    """Scatter of every run (metric vs cost) with the Pareto front drawn and labelled; PNG."""
    from matplotlib.figure import Figure as MplFigure

    from greenstack.io import atomic_write_bytes

    fig = MplFigure(figsize=(7.2, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    pts = [r for r in comparison.rows if r.metric is not None and r.cost is not None]
    grams = comparison.cost == "carbon/total_kg_co2e"
    scale = 1000.0 if grams else 1.0
    if not pts:
        ax.text(0.5, 0.5, f"no run has both {comparison.metric} and {comparison.cost}", ha="center",
                transform=ax.transAxes)
    else:
        other = [r for r in pts if not r.pareto]
        front = sorted((r for r in pts if r.pareto), key=lambda r: r.cost)  # type: ignore[arg-type, return-value]
        if other:
            ax.scatter([r.cost * scale for r in other], [r.metric for r in other], color="#8c959f",  # type: ignore[operator]
                       label="dominated", zorder=2)
        # a staircase: between two front runs, only the cheaper run's accuracy is known to be reachable
        ax.plot([r.cost * scale for r in front], [r.metric for r in front], "o-", color="#1a7f37",  # type: ignore[operator]
                drawstyle="steps-post", label="Pareto front", zorder=3)
        for r in pts:
            text = " ".join(r.overrides) if r.overrides and len(" ".join(r.overrides)) < 40 else r.label
            ax.annotate(text, (r.cost * scale, r.metric), textcoords="offset points", xytext=(4, 4),  # type: ignore[operator]
                        fontsize=7)
        costs = [r.cost for r in pts if r.cost and r.cost > 0]
        if costs and max(costs) / min(costs) > 50:
            ax.set_xscale("log")
        ax.legend(fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)
    ax.set_xlabel("gCO2eq" if grams else comparison.cost)
    ax.set_ylabel(comparison.metric)
    ax.set_title(f"{comparison.metric} vs {'emissions' if grams else comparison.cost}: "
                 f"{plural(len(pts), 'run')}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out)
    atomic_write_bytes(out, buf.getvalue())
    comparison.plot = str(out)
    return out
