"""Alert rules over a stream of metric readings: thresholds with patience, and plateaus.

The rules only say *when* something is wrong; the Alerts policy decides what to do (act or warn) and
logs each firing with the metric value that triggered it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

AlertAction = Literal["act", "warn", "off"]
ACTIONS = ("act", "warn", "off")


@dataclass
class ThresholdRule:
    """Fires once when `metric` stays beyond `threshold` for `patience` consecutive readings.

    It re-arms when a reading comes back within the threshold, so a later excursion fires again.
    """

    name: str
    metric: str
    threshold: float
    above: bool
    patience: int = 1
    consecutive: int = 0
    fired: int = 0

    def beyond(self, value: float) -> bool:
        return value > self.threshold if self.above else value < self.threshold

    def update(self, value: float) -> bool:
        """Feed one reading; True when the rule fires on it."""
        if math.isnan(value) or not self.beyond(value):
            self.consecutive = 0
            return False
        self.consecutive += 1
        if self.consecutive == self.patience:
            self.fired += 1
            return True
        return False


@dataclass
class PlateauRule:
    """Fires when `metric` has not improved by more than `min_delta` for `patience` evaluations."""

    name: str
    metric: str
    mode: Literal["min", "max"] = "min"
    patience: int = 5
    min_delta: float = 0.0
    best: float = math.nan
    bad: int = 0
    fired: int = 0

    def update(self, value: float) -> bool:
        from greenstack.tasks.base import has_improved

        if has_improved(value, self.best, mode=self.mode, min_delta=self.min_delta):
            self.best, self.bad = value, 0
            return False
        self.bad += 1
        if self.bad == self.patience:
            self.fired += 1
            return True
        return False
