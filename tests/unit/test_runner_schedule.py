"""Start-time scheduling happens before the run builds anything (no model, data or tracker while waiting),
once: the run's loop does not fire INIT at a scheduler that already decided."""

from __future__ import annotations

import json
from pathlib import Path

import greenstack.runner as runner
from greenstack.compose import compose_with_problems
from greenstack.engine.events import Event
from greenstack.policies.scheduler._base import SchedulerPolicy, StartContext
from tests.conftest import FAST
from tests.helpers.hooks import fire

CALLS = "calls.txt"  # in the run dir: Hydra may import this module under another name than pytest did


def _note(run_dir: str | Path, what: str) -> None:
    with open(Path(run_dir) / CALLS, "a", encoding="utf-8") as f:
        f.write(what + "\n")


class Probe(SchedulerPolicy):
    """A start-time scheduler that notes when it decided relative to what the runner builds."""

    events = frozenset({Event.INIT})
    start_time = True

    def __init__(self) -> None:
        super().__init__(name="probe")

    def decide(self, state: StartContext, reporter) -> None:
        _note(state.run_dir, "probe decides")
        self.record(state, reporter, "start", {"why": "test"}, {"start": self.now()}, expected_saving_pct=12.5)

    def __call__(self, event, state, reporter):
        _note(state.run_dir, f"probe {event.name}")
        super().__call__(event, state, reporter)


def test_scheduler_decides_once_before_data_model_and_tracker_are_built(tmp_path, monkeypatch):
    real = runner.instantiate

    def spy(node, *args, **kwargs):
        target = str(node.get("_target_", "")) if hasattr(node, "get") else ""
        _note(tmp_path, target.rsplit(".", 1)[-1])
        return real(node, *args, **kwargs)

    monkeypatch.setattr(runner, "instantiate", spy)
    cfg, problems = compose_with_problems(["recipe=quickstart", *FAST, "model.name=resnet10t",
                                           "scheduler._target_=tests.unit.test_runner_schedule.Probe"])
    assert not problems, problems
    runner.run(cfg, tmp_path)
    calls = (tmp_path / CALLS).read_text().splitlines()
    probe = calls.index("probe decides")
    built = [i for i, name in enumerate(calls) if name in ("digits", "build_timm", "NullTracker", "WandbTracker")]
    assert built and probe < min(built), calls
    # decided once, before anything was built; the run's loop never fired INIT at it
    assert calls.count("probe decides") == 1 and "probe INIT" not in calls, calls
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("scheduler/expected_saving_pct") == 12.5 for r in rows)  # its metrics reach the run


def test_a_loop_without_the_runner_decides_at_init(tmp_path):
    """Used directly (a Trainer of one's own), a start-time scheduler decides at INIT, once."""
    from types import SimpleNamespace

    probe = Probe()
    state = SimpleNamespace(metrics={}, run_dir=str(tmp_path), region=None)
    assert probe.handles(Event.INIT, state)
    fire(probe, Event.INIT, state)
    assert state.metrics.get("scheduler/expected_saving_pct") == 12.5
    assert not probe.handles(Event.INIT, state)  # decided: not again
    assert (tmp_path / CALLS).read_text().splitlines() == ["probe INIT", "probe decides"]
