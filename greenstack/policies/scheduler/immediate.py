"""`scheduler=immediate` (the default): start at once, and say so in the run's decisions."""

from __future__ import annotations

from typing import Any

from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.policies.scheduler._base import SchedulerPolicy, StartContext


class Immediate(SchedulerPolicy):
    """No waiting, no lookups (no network): one recorded decision "start now", expected saving 0 %."""

    events = frozenset({Event.INIT})
    start_time = True

    def __init__(self, **kw: Any) -> None:
        super().__init__(name="immediate", **kw)

    def decide(self, state: StartContext, reporter: Reporter) -> None:
        if not self.decisions:
            self.record(state, reporter, "start_now", {"policy": "immediate"}, {"start": self.now().isoformat()},
                        expected_saving_pct=0.0, provenance="measured",
                        notes=["scheduler=immediate: no carbon-aware scheduling (try scheduler=forecast_window)"])
