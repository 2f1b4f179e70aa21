"""`scheduler=threshold`: start once grid intensity drops below a level, or when the deadline forces it.

The level is either absolute (`threshold_g_per_kwh`) or relative: the `percentile` of the intensity
observed over `lookback` before the run (why relative by default: a fixed g/kWh means nothing across
zones and seasons). The policy polls the source every `poll`; `duration` and `deadline` give the
latest start, at which it starts regardless. Same start-now routes as every scheduler policy.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import numpy as np

from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.errors import ConfigError, Problem, between, checked, collecting
from greenstack.policies.scheduler._base import SchedulerPolicy, StartContext
from greenstack.scheduling.outlook import intensity_now, observed_levels, weather_note
from greenstack.scheduling.timeparse import parse_deadline, parse_hours

INTENSITY = between(0, 2000, low_open=True, fix="gCO2eq/kWh, or null for a percentile level")
PERCENTILE = between(0, 100, low_open=True, high_open=True, fix="a percentile, e.g. 25")


class Threshold(SchedulerPolicy):
    """Wait until intensity < level (absolute or a recent percentile), at most until the latest start."""

    events = frozenset({Event.INIT})
    start_time = True

    @checked("scheduler")
    def __init__(self, threshold_g_per_kwh: Annotated[float | None, INTENSITY] = None,
                 percentile: Annotated[float, PERCENTILE] = 25.0, lookback: str = "7d",
                 duration: str | float = "1h", deadline: str | float = "24h", poll: str | float = "5m",
                 start_now: bool = False, countdown_every_s: float = 300.0, zone: str | None = None,
                 trace: str | None = None, carbon: Any = None, clock: Callable[[], float] | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        problems: list[Problem] = []
        key = "scheduler"

        def parse(fn: Callable[[], Any], default: Any) -> Any:
            return collecting(problems, fn, default)

        self.lookback_h = parse(lambda: parse_hours(lookback, f"{key}.lookback"), 168.0)
        self.duration_h = parse(lambda: parse_hours(duration, f"{key}.duration"), 1.0)
        self.poll_s = parse(lambda: parse_hours(poll, f"{key}.poll"), 1 / 12) * 3600
        now = datetime.fromtimestamp((clock or time.time)(), tz=timezone.utc)
        self.deadline = parse(lambda: parse_deadline(deadline, now, f"{key}.deadline"), None)
        if self.deadline is not None and not problems:
            left_h = (self.deadline - now).total_seconds() / 3600
            if left_h < self.duration_h:
                problems.append(Problem(f"{key}.deadline", deadline, f"leaves {left_h:.2f} h, shorter than the job "
                                        f"({duration})", f"give a deadline of at least {duration}"))
        try:
            super().__init__(name="threshold", zone=zone, trace=trace, carbon=carbon, start_now=start_now,
                             clock=clock, sleep=sleep)
        except ConfigError as err:
            problems += err.problems
        if problems:
            raise ConfigError(problems)
        self.threshold_g_per_kwh, self.percentile = threshold_g_per_kwh, float(percentile)
        self.countdown_every_s = countdown_every_s
        self.level: float | None = None

    def level_at(self, now: datetime) -> tuple[float, str]:
        """The start level and how it was obtained."""
        if self.threshold_g_per_kwh is not None:
            return float(self.threshold_g_per_kwh), "configured threshold_g_per_kwh"
        hours = max(1, int(math.ceil(self.lookback_h)))
        past = observed_levels(self.source(), now, hours)
        return float(np.percentile(past, self.percentile)), f"p{self.percentile:g} of the {hours} h before the run"

    def decide(self, state: StartContext, reporter: Reporter) -> None:
        if self.decisions:  # replayed from a recorded run
            return
        request = self.start_request(state) or self.resumed_run(state)
        if request is not None:
            self.record(state, reporter, "start_now", {"requested_by": request}, {"start": self.now()})
            return
        arrival = self.now()
        latest = self.deadline - timedelta(hours=self.duration_h)
        level, how = self.level_at(arrival)
        self.level = level
        first, prov, src = intensity_now(self.source(), arrival)
        inputs = {"level_g_per_kwh": level, "level_from": how, "intensity_now_g_per_kwh": first,
                  "latest_start": latest, "source": src, "weather_columns": []}
        unused = weather_note(self.source(), "the threshold rule")
        if first < level:
            self.record(state, reporter, "start_now", inputs, {"start": arrival}, expected_saving_pct=0.0, provenance=prov,
                        numbers={"threshold_g_per_kwh": level, "intensity_at_start_g_per_kwh": first},
                        notes=[f"intensity {first:.0f} g/kWh is below the level {level:.0f}: starting now", *unused])
            return
        self.record(state, reporter, "wait", inputs, {"until": f"intensity < {level:.1f} g/kWh or {latest.isoformat()}"},
                    provenance=prov, numbers={"threshold_g_per_kwh": level}, notes=unused)
        seen = {"intensity": first, "below": False}

        def check() -> float | None:
            value, _, _ = intensity_now(self.source(), self.now())
            seen["intensity"] = value
            if value < level:
                seen["below"] = True
                return self.clock()  # start now
            return None

        reason = self.wait_until(latest.timestamp(), state, tick_s=self.poll_s,
                                 countdown_every_s=self.countdown_every_s, on_tick=check,
                                 describe=lambda left: f"waiting for intensity < {level:.0f} g/kWh (now "
                                                       f"{seen['intensity']:.0f}); latest start in {left / 3600:.1f} h")
        if seen["below"]:
            reason = f"intensity {seen['intensity']:.0f} g/kWh below the level {level:.0f}"
        elif not reason.startswith("started early"):
            reason = "latest start reached (deadline)"
        at_start = seen["intensity"]
        saving = 100.0 * (first - at_start) / first if first > 0 else 0.0
        self.record(state, reporter, "start", {"reason": reason, "intensity_at_arrival_g_per_kwh": first},
                    {"start": self.now(), "waited_s": round(self.waited_s, 3), "intensity_at_start_g_per_kwh": at_start},
                    expected_saving_pct=saving, provenance=prov,
                    numbers={"wait_s": self.waited_s, "intensity_at_start_g_per_kwh": at_start},
                    notes=[f"{reason}; expected saving = intensity at start vs at arrival (hourly values)"])
