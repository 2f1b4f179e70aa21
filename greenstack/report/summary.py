"""The run's report: final weights, sustainability.json and the figures sent to trackers.

`RunReport` contributes an observer policy to the loop (timing now; energy/carbon sampling when the
measurement layer is configured) and, at the end, writes every figure with unit, provenance and source.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from greenstack import __version__
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.io import atomic_write_json, dumps, publish
from greenstack.measure import Measurement, measure_latency_ms, write_emissions_csv
from greenstack.provenance import Figure
from greenstack.tasks import Classification

log = logging.getLogger("greenstack")


RUN_STATUSES = ("completed", "interrupted", "failed", "budget_stopped")


def _spent(metrics: dict[str, Figure]) -> str:
    """'12 steps, 0.0031 kWh, 0.0012 kgCO2eq': what a partial run had spent, for its one terminal line."""
    steps = metrics["train/steps"].value
    parts = [f"{steps} step{'' if steps == 1 else 's'}"]
    for key, unit in (("energy/total_kwh", "kWh"), ("carbon/total_kg_co2e", "kgCO2eq")):
        value = metrics[key].value if key in metrics else None
        if isinstance(value, (int, float)):
            parts.append(f"{value:.3g} {unit}")
    return ", ".join(parts)


class _Clock(Policy):
    """Wall-clock of the fit, measured."""

    role = Role.OBSERVER

    events = frozenset({Event.FIT_START, Event.FIT_END})

    def __init__(self) -> None:
        super().__init__(name="clock")
        self.started_at: datetime | None = None
        self.ended_at: datetime | None = None
        self._t0 = 0.0
        self.duration_s = 0.0

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.FIT_START:
            self.started_at, self._t0 = datetime.now(timezone.utc), time.perf_counter()
        else:
            self.ended_at, self.duration_s = datetime.now(timezone.utc), time.perf_counter() - self._t0


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Final weights as safetensors, published atomically."""
    from safetensors.torch import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".model.", suffix=".tmp")
    os.close(fd)
    try:
        save_model(model, tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunReport:
    """Collects what a run measured and writes it out at the end."""

    def __init__(self, cfg: DictConfig, *, run_dir: Path, run_id: str, measurement: Measurement | None = None) -> None:
        self.cfg, self.run_dir, self.run_id = cfg, run_dir, run_id
        self.clock = _Clock()
        self.measurement = measurement
        #: sustainability.json is out: a later failure (report, tracker) must not replace it with a partial one
        self.written = False
        #: sustainability.json's object as written (what a reader of the file gets), once written
        self.summary_json: dict[str, Any] | None = None

    def policies(self) -> list[Policy]:
        return [self.clock] + ([self.measurement] if self.measurement is not None else [])

    def finish(self, state: State, *, trainer: Any, data: Any, policies: list[Policy]) -> dict[str, Any]:
        """The end of a run that trained to its end (or was stopped by a policy): every figure."""
        weights = self.run_dir / "model.safetensors"
        writer = state.rank == 0  # a multi-process run has one set of outputs, written by rank 0
        if writer:
            save_weights(state.model, weights)
            self._save_inference_files(state.model, data)
        step_times = trainer.step_times_s
        metrics: dict[str, Figure] = {
            "time/median_step_s": Figure(statistics.median(step_times) if step_times else None, "s",
                                         "measured", "time.perf_counter per optimizer step"),
            "efficiency/model_size_mb": Figure(round(weights.stat().st_size / 1e6, 4) if writer else None, "MB",
                                               "measured", "size of model.safetensors"),
            "model/parameters": Figure(sum(p.numel() for p in state.model.parameters()), "count", "measured",
                                       "sum of parameter numel"),
        }
        final = trainer.last_eval
        task = getattr(trainer, "task", None) or Classification()
        for key, unit in task.report.items():  # the task's evaluation figures
            if key in final:
                metrics[key] = Figure(final[key], unit, "measured", f"evaluation on the {key.split('/')[0]} split")
        for key, fig in getattr(data, "figures", {}).items():  # e.g. a corpus's unigram baseline
            metrics[key] = fig
        latency, size = None, 0
        if self.measurement is not None:
            batch = state.batch
            latency = measure_latency_ms(state.model, batch)
            size = task.samples(batch) if isinstance(batch, dict) else 0
        return self.complete(state, metrics, policies, latency_ms=latency, latency_batch=size)

    def complete(self, state: State, figures: dict[str, Figure], policies: list[Policy], *,
                 latency_ms: float | None = None, latency_batch: int = 0) -> dict[str, Any]:
        """sustainability.json and emissions.csv of a run that left its loop normally, from the figures
        the loop measured itself (`figures`) plus progress, energy, carbon, cost and the policies' figures.

        Why separate from `finish`: `greenstack.track` and the framework callbacks end runs greenstack's
        loop did not drive (no weights to save, no evaluation) and must write the same files.
        """
        metrics = self._progress_figures(state)
        metrics.update(figures)
        if self.measurement is not None:
            measured, row = self.measurement.final(state, latency_ms, latency_batch)
            metrics.update(measured)
            self._write_emissions(state, row)
        for policy in policies:
            for key, fig in policy.summary().items():
                metrics[key] = fig if isinstance(fig, Figure) else Figure(fig, "", "measured", policy.name)
        status = self.status_of(state)
        return self._write_summary(state, metrics, policies, status=status,
                                   reason=state.stop_reason if status != "completed" else None)

    def _save_inference_files(self, model: torch.nn.Module, data: Any) -> None:
        """labels.json (+ model/ for transformers): what using the trained model needs."""
        from greenstack.inference import save_inference_files

        try:
            save_inference_files(model, data, self.run_dir)
        except Exception as e:  # noqa: BLE001 - the weights are saved; say what is missing, keep the run
            log.warning("could not save the files for prediction (labels.json, model/): %s: %s", type(e).__name__, e)

    def status_of(self, state: State) -> str:
        """How a run that left the loop normally ended: completed, or stopped by its carbon budget.

        A policy that stops a run for a failure says so with `state.run_status = "failed"` next to
        `state.request_stop(reason)`.
        """
        explicit = state.run_status
        if explicit in RUN_STATUSES:
            return explicit
        decision = self.measurement.budget_decision if self.measurement is not None else None
        if state.stop and decision is not None and decision.get("action") == "stop":
            return "budget_stopped"
        return "completed"

    def finish_partial(self, state: State | None, *, status: str, reason: str,
                       policies: list[Policy]) -> dict[str, Any] | None:
        """The end of a run that did not reach its end (interrupted, failed): what was spent so far.

        No weights, no evaluation: only the figures measured until now, flagged `"partial": true`.
        Never raises (the run's own error is what the user must see); returns None when nothing
        was written (nothing measured yet, or the full summary is already out).
        """
        if self.written or state is None:
            return None
        try:
            metrics = self._progress_figures(state)
            if self.measurement is not None:
                figures, row = self.measurement.final(state, None, 0, reduce=False)
                metrics.update(figures)
                self._write_emissions(state, row)
            for policy in policies:
                try:
                    for key, fig in policy.summary().items():
                        metrics[key] = fig if isinstance(fig, Figure) else Figure(fig, "", "measured", policy.name)
                except Exception:  # noqa: BLE001 - a policy's summary must not cost the run its accounting
                    log.debug("summary of %s failed in a partial run", policy.name, exc_info=True)
            return self._write_summary(state, metrics, policies, status=status, reason=reason)
        except Exception:  # noqa: BLE001 - see docstring
            log.warning("could not write the partial accounting of this run", exc_info=True)
            return None

    def _progress_figures(self, state: State) -> dict[str, Figure]:
        duration = self.clock.duration_s if self.clock.ended_at is not None or not self.clock._t0 \
            else time.perf_counter() - self.clock._t0
        figures = {
            "time/duration_s": Figure(round(duration, 3), "s", "measured", "time.perf_counter"),
            "train/steps": Figure(state.step, "steps", "measured", "loop"),
            "train/samples": Figure(state.samples_seen, "samples", "measured", "loop"),
        }
        if state.tokens_seen:  # tasks that count tokens (causal_lm)
            figures["train/tokens"] = Figure(state.tokens_seen, "tokens", "measured", "loop: target tokens trained on")
            figures["efficiency/tokens_per_s"] = Figure(
                state.tokens_seen / duration if duration > 0 else None, "tokens/s", "measured",
                "training target tokens / time/duration_s (time.perf_counter)")
        return figures

    def _write_emissions(self, state: State, row: dict[str, Any]) -> None:
        if row and state.rank == 0:
            row.update(project_name=self.cfg.get("project"), run_id=self.run_id,
                       experiment_id=self.cfg.get("run_name") or "")
            resumed = self.measurement is not None and self.measurement.resumed
            # a resumed run's row includes its earlier segments: it replaces their partial rows
            write_emissions_csv(self.run_dir / "emissions.csv", row, replace_run_id=self.run_id if resumed else None)

    def _write_summary(self, state: State, metrics: dict[str, Figure], policies: list[Policy], *, status: str,
                       reason: str | None) -> dict[str, Any]:
        ended_at = self.clock.ended_at or datetime.now(timezone.utc)
        summary = {
            "schema": "greenstack.sustainability/1",
            "run_id": self.run_id,
            "run_name": self.cfg.get("run_name"),
            "greenstack_version": __version__,
            "status": status,
            "partial": status != "completed",
            "started_at": self.clock.started_at.isoformat() if self.clock.started_at else None,
            "ended_at": ended_at.isoformat() if self.clock.started_at else None,
            "stopped_early": state.stop_reason or None,
            "host": {"platform": platform.platform(), "python": platform.python_version(),
                     "torch": torch.__version__, "device": str(state.device)},
            "metrics": {k: v.to_dict() for k, v in metrics.items()},
        }
        if status != "completed":
            summary["end_reason"] = reason
        for policy in policies:  # geo-distributed runs: per-region energy, emissions, steps, bytes
            region = policy.region_report()
            if region is not None:
                summary["federated"] = region
        if self.measurement is not None:
            summary["energy_meters"] = self.measurement.meter_notes
            summary["carbon_source"] = self.measurement.source.describe()
            summary["carbon_budget"] = self.measurement.budget_decision
        if state.rank == 0:
            atomic_write_json(self.run_dir / "sustainability.json", summary)
            self.written = True
            self.summary_json = json.loads(dumps(summary))
            if status != "completed":
                said = reason if status == "interrupted" and (reason or "").startswith("interrupted") \
                    else f"run {status.replace('_', ' ')}: {reason or 'no reason given'}"
                log.warning("%s: partial accounting in %s (sustainability.json, emissions.csv): %s", said,
                            self.run_dir, _spent(metrics))
        summary["flat"] = {k: v.value for k, v in metrics.items() if isinstance(v.value, (int, float))}
        return summary

    def close(self) -> None:
        """Release resources (meter threads); safe to call twice."""
        if self.measurement is not None:
            self.measurement.close()
