"""Start-time scheduling happens before the run builds anything (no model, data or tracker while waiting)."""

from __future__ import annotations

import json

import greenstack.runner as runner
from greenstack.compose import compose_with_problems
from greenstack.engine.events import Event
from greenstack.policies.scheduler._base import SchedulerPolicy
from tests.conftest import FAST


def _calls() -> list[str]:
    """One list shared by this module and the copy Hydra imports by name (pytest may import it as another)."""
    return runner.__dict__.setdefault("_test_calls", [])


class Probe(SchedulerPolicy):
    """A start-time scheduler that notes when it ran relative to what the runner builds."""

    events = frozenset({Event.INIT})

    def __init__(self) -> None:
        super().__init__(name="probe")

    def __call__(self, event, state, reporter):
        if self.decisions:
            _calls().append("probe again")
            return
        _calls().append("probe")
        self.record(state, reporter, "start", {"why": "test"}, {"start": self.now()}, expected_saving_pct=12.5)


def test_scheduler_decides_before_data_model_and_tracker_are_built(tmp_path, monkeypatch):
    real = runner.instantiate

    def spy(node, *args, **kwargs):
        target = str(node.get("_target_", "")) if hasattr(node, "get") else ""
        _calls().append(target.rsplit(".", 1)[-1])
        return real(node, *args, **kwargs)

    monkeypatch.setattr(runner, "instantiate", spy)
    monkeypatch.setitem(runner.__dict__, "_test_calls", [])
    calls = _calls()
    cfg, problems = compose_with_problems(["recipe=quickstart", *FAST, "model.name=resnet10t",
                                           "scheduler._target_=tests.unit.test_runner_schedule.Probe"])
    assert not problems, problems
    runner.run(cfg, tmp_path)
    probe = calls.index("probe")
    built = [i for i, name in enumerate(calls) if name in ("digits", "build_timm", "NullTracker", "WandbTracker")]
    assert built and probe < min(built), calls
    # decided once; at the run's own INIT (after everything was built) it found its decision taken
    assert calls.count("probe") == 1 and calls.index("probe again") > max(built)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("scheduler/expected_saving_pct") == 12.5 for r in rows)  # its metrics reach the run
