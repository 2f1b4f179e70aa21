"""`scheduler=region`: choose where (and when) to run among candidate zones, trading carbon and price.

score = w_carbon * (1 - I / I_max) + w_price * (1 - spot / on_demand)  (defaults 0.6 / 0.4), where I
is a candidate's expected mean intensity over its best window within `slack`, and prices come from
the dated catalog (`greenstack/scheduling/data/prices_*.json`, shared with `report tco`, or `catalog=PATH`). A running
process cannot move itself: the policy records the choice (and sets `state.region`) so the run's
report and tracker show it, and warns when the run is not where greenstack would place it; a
launcher acts on `choose_region(...)` before submitting.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.errors import ConfigError, Problem
from greenstack.policies.scheduler._base import SchedulerPolicy, StartContext
from greenstack.scheduling.prices import KINDS, PriceCatalog, load_price_catalog
from greenstack.scheduling.regions import RegionScore, check_weights, choose_region, parse_candidates
from greenstack.scheduling.timeparse import parse_hours


class RegionChoice(SchedulerPolicy):
    """Pick the candidate zone with the best carbon/price score (see module docstring)."""

    events = frozenset({Event.INIT})
    start_time = True

    def __init__(self, candidates: list[str] | str = (), kind: str = "gpu", w_carbon: float = 0.6,
                 w_price: float = 0.4, duration: str | float = "1h", slack: str | float = "0h",
                 catalog: str | None = None, objective: str | float = "mean", current: str | None = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> None:
        problems: list[Problem] = []
        key = "scheduler"
        self.zones: list[str] = []
        try:
            self.zones = parse_candidates(candidates, f"{key}.candidates")
        except ConfigError as err:
            problems += err.problems
        if kind not in KINDS:
            problems.append(Problem(f"{key}.kind", kind, "unknown instance kind", f"one of {', '.join(KINDS)}"))
        problems += check_weights(w_carbon, w_price, prefix=f"{key}.")
        for name, text, zero in (("duration", duration, False), ("slack", slack, True)):
            try:
                setattr(self, f"{name}_h", parse_hours(text, f"{key}.{name}", allow_zero=zero))
            except ConfigError as err:
                problems += err.problems
        self.catalog: PriceCatalog | None = None
        try:
            self.catalog = load_price_catalog(catalog)
        except ConfigError as err:
            problems += [Problem(f"{key}.catalog" if p.key == "catalog" else p.key, p.value, p.reason, p.fix)
                         for p in err.problems]
        if self.catalog is not None and kind in KINDS:
            for zone in self.zones:
                try:
                    self.catalog.offer(zone, kind)
                except ConfigError as err:
                    problems += [Problem(f"{key}.candidates", zone, p.reason, p.fix) for p in err.problems]
        super().__init__(name="region", clock=clock, sleep=sleep)
        if problems:
            raise ConfigError(problems)
        self.kind, self.w_carbon, self.w_price, self.objective = kind, float(w_carbon), float(w_price), objective
        self.current = current
        self.ranking: list[RegionScore] = []
        #: (zone, source) chosen by a recorded run (efficiency.decisions_from): no re-ranking
        self.replayed: tuple[str, str] | None = None

    def replay(self, entries: list[dict[str, Any]], source: str) -> bool:
        """Place the run where the recorded run was placed (its prices and intensities were of then)."""
        chosen = next((e.get("choice", {}).get("zone") for e in entries if e.get("action") == "choose_region"), None)
        if not isinstance(chosen, str):
            return False
        self.replayed = (chosen, source)
        return True

    def decide(self, state: StartContext, reporter: Reporter) -> None:
        if self.decisions:  # replayed from a recorded run
            return
        if not self.zones:
            raise ConfigError(Problem("scheduler.candidates", [], "empty candidate list: nothing to choose from",
                                      "give at least one zone, e.g. scheduler.candidates=[GB,DE-LU]"))
        if self.replayed is not None:
            zone, source = self.replayed
            state.region = zone
            self.record(state, reporter, "choose_region", {"replayed_from": source}, {"zone": zone},
                        notes=[f"decision replayed from {source}"])
            return
        assert self.catalog is not None
        start = datetime.fromtimestamp(self.clock(), tz=timezone.utc)
        self.ranking, notes = choose_region(self.zones, self.catalog, kind=self.kind, start=start,
                                            duration_h=self.duration_h, slack_h=self.slack_h, w_carbon=self.w_carbon,
                                            w_price=self.w_price, objective=self.objective)
        best = self.ranking[0]
        here = self.current or state.region
        home_zone = next((z for z in self.zones if here and z.upper() == str(here).upper()), self.zones[0])
        home = next(r for r in self.ranking if r.candidate.zone == home_zone)
        home_now = home.candidate.intensity_now_g_per_kwh or 0.0
        saving = 100.0 * (home_now - best.candidate.intensity_g_per_kwh) / home_now if home_now > 0 else 0.0
        notes.append(f"expected saving is vs running now in {home_zone} ({home_now:.0f} g/kWh)")
        if here and str(here).upper() != best.candidate.zone.upper():
            notes.append(f"this run is in {here}; greenstack would place it in {best.candidate.zone} "
                         "(a running process cannot move: submit there, or let a launcher act on choose_region)")
        state.region = best.candidate.zone
        self.record(state, reporter, "choose_region",
                    {"candidates": [r.to_dict() for r in self.ranking], "kind": self.kind,
                     "weights": {"w_carbon": self.w_carbon, "w_price": self.w_price},
                     "catalog": {"path": self.catalog.path, "as_of": self.catalog.as_of},
                     "duration_h": self.duration_h, "slack_h": self.slack_h, "source": best.candidate.source},
                    {"zone": best.candidate.zone, "start": best.candidate.start, "score": best.score,
                     "offer": best.candidate.offer.to_dict()},
                    expected_saving_pct=saving, provenance=best.candidate.provenance, notes=notes,
                    numbers={"region_score": best.score,
                             "region_expected_g_per_kwh": best.candidate.intensity_g_per_kwh,
                             "region_spot_ratio": best.candidate.offer.spot_ratio})

