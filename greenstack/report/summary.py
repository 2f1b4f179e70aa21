"""The run's report: final weights, sustainability.json and the figures sent to trackers.

`RunReport` contributes an observer policy to the loop (timing now; energy/carbon sampling when the
measurement layer is configured) and, at the end, writes every figure with unit, provenance and source.
"""

from __future__ import annotations

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
from greenstack.engine.policy import Policy
from greenstack.engine.state import State
from greenstack.io import atomic_write_json, publish
from greenstack.measure import Measurement, measure_latency_ms, write_emissions_csv
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")


class _Clock(Policy):
    """Wall-clock of the fit, measured."""

    events = frozenset({Event.FIT_START, Event.FIT_END})

    def __init__(self) -> None:
        super().__init__(name="clock")
        self.started_at: datetime | None = None
        self.ended_at: datetime | None = None
        self._t0 = 0.0
        self.duration_s = 0.0

    def __call__(self, event: Event, state: State) -> None:
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

    def policies(self) -> list[Policy]:
        return [self.clock] + ([self.measurement] if self.measurement is not None else [])

    def finish(self, state: State, *, trainer: Any, data: Any, policies: list[Policy]) -> dict[str, Any]:
        weights = self.run_dir / "model.safetensors"
        writer = state.rank == 0  # a multi-process run has one set of outputs, written by rank 0
        if writer:
            save_weights(state.model, weights)
        n_params = sum(p.numel() for p in state.model.parameters())
        step_times = trainer.step_times_s
        metrics: dict[str, Figure] = {
            "time/duration_s": Figure(round(self.clock.duration_s, 3), "s", "measured", "time.perf_counter"),
            "train/steps": Figure(state.step, "steps", "measured", "loop"),
            "train/samples": Figure(state.samples_seen, "samples", "measured", "loop"),
            "time/median_step_s": Figure(statistics.median(step_times) if step_times else None, "s",
                                         "measured", "time.perf_counter per optimizer step"),
            "efficiency/model_size_mb": Figure(round(weights.stat().st_size / 1e6, 4) if writer else None, "MB",
                                               "measured", "size of model.safetensors"),
            "model/parameters": Figure(n_params, "count", "measured", "sum of parameter numel"),
        }
        final = trainer.last_eval
        for key in ("val/accuracy", "test/accuracy", "test/loss"):
            if key in final:
                metrics[key] = Figure(final[key], "fraction" if "accuracy" in key else "nats", "measured",
                                      f"evaluation on the {key.split('/')[0]} split")
        if self.measurement is not None:
            batch = state.batch
            latency = measure_latency_ms(state.model, batch)
            size = int(batch["labels"].shape[0]) if isinstance(batch, dict) else 0
            figures, row = self.measurement.final(state, latency, size)
            metrics.update(figures)
            if row and state.rank == 0:
                row.update(project_name=self.cfg.get("project"), run_id=self.run_id,
                           experiment_id=self.cfg.get("run_name") or "")
                write_emissions_csv(self.run_dir / "emissions.csv", row)
        for policy in policies:
            for key, fig in policy.summary().items():
                metrics[key] = fig if isinstance(fig, Figure) else Figure(fig, "", "measured", policy.name)
        summary = {
            "schema": "greenstack.sustainability/1",
            "run_id": self.run_id,
            "run_name": self.cfg.get("run_name"),
            "greenstack_version": __version__,
            "started_at": self.clock.started_at.isoformat() if self.clock.started_at else None,
            "ended_at": self.clock.ended_at.isoformat() if self.clock.ended_at else None,
            "stopped_early": state.stop_reason or None,
            "host": {"platform": platform.platform(), "python": platform.python_version(),
                     "torch": torch.__version__, "device": str(state.device)},
            "metrics": {k: v.to_dict() for k, v in metrics.items()},
        }
        for policy in policies:  # geo-distributed runs: per-region energy, emissions, steps, bytes
            region_report = getattr(policy, "region_report", None)
            if callable(region_report) and region_report() is not None:
                summary["federated"] = region_report()
        if self.measurement is not None:
            summary["energy_meters"] = self.measurement.meter_notes
            summary["carbon_source"] = self.measurement.source.describe()
            summary["carbon_budget"] = self.measurement.budget_decision
        if writer:
            atomic_write_json(self.run_dir / "sustainability.json", summary)
        summary["flat"] = {k: v.value for k, v in metrics.items() if isinstance(v.value, (int, float))}
        return summary

    def close(self) -> None:
        """Release resources (meter threads); safe to call twice."""
        if self.measurement is not None:
            self.measurement.close()
