"""A simulated wall clock for start-time schedulers: `time()` and `sleep()` without waiting."""

from __future__ import annotations

from datetime import datetime


class SimClock:
    """Starts at an ISO instant; `sleep` advances it at once and records the seconds slept."""

    def __init__(self, start: str) -> None:
        self.t = datetime.fromisoformat(start).timestamp()
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds
