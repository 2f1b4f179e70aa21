"""A test policy that takes an in-memory snapshot at a step, or restores one at INIT (a resumed run)."""

from __future__ import annotations

from typing import Any

from greenstack.checkpoint.snapshot import apply_snapshot, capture
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy
from greenstack.engine.reporter import Reporter


class SnapshotAt(Policy):
    """`SnapshotAt(step=6)` captures the state after step 6 (`.snapshot`); `SnapshotAt(restore=snap)`
    applies `snap` at INIT, as the checkpointing policy does when a run resumes. Both are named "snap",
    so the two runs' policy lists line up for the snapshot's policy states."""

    events = frozenset({Event.STEP_END, Event.INIT})

    def __init__(self, step: int | None = None, restore: Any = None) -> None:
        super().__init__(name="snap")
        self.at, self.restore = step, restore
        self.snapshot: Any = None

    def __call__(self, event: Event, state: Any, reporter: Reporter) -> None:
        if event is Event.INIT and self.restore is not None:
            apply_snapshot(self.restore, state)
        elif event is Event.STEP_END and state.step == self.at and self.snapshot is None:
            self.snapshot = capture(state)
