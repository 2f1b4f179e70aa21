"""Region choice: trade grid carbon intensity against the spot discount of each candidate region
(`choose_region`, shared by `scheduler=region` and `greenstack plan region`).

    score = w_carbon * (1 - I / I_max) + w_price * (1 - spot / on_demand)

I is a candidate's expected mean intensity over its best window (so "where" and "when" are answered
together), I_max the highest I among the candidates; the weights default to 0.6 / 0.4. Why this
form: both terms are in [0, 1] and unit-free, so a user can reason about the weights; the spot
discount stands for what the region's spare capacity saves. A region without a spot market gets
a price term of 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from greenstack.errors import ConfigError, Problem
from greenstack.scheduling.outlook import intensity_outlook
from greenstack.scheduling.prices import Offer, PriceCatalog
from greenstack.scheduling.windows import best_window

DEFAULT_W_CARBON = 0.6
DEFAULT_W_PRICE = 0.4


def check_weights(w_carbon: float, w_price: float, prefix: str = "") -> list[Problem]:
    """Problems with a pair of weights: each in [0, 1] and summing to 1."""
    problems = []
    for key, value in (("w_carbon", w_carbon), ("w_price", w_price)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            problems.append(Problem(f"{prefix}{key}", value, "a weight must be a number in [0, 1]", "e.g. 0.6"))
    if not problems and abs(w_carbon + w_price - 1.0) > 1e-9:
        problems.append(Problem(f"{prefix}w_price", w_price, f"w_carbon + w_price = {w_carbon + w_price:g}, not 1",
                                f"e.g. w_carbon={w_carbon:g} w_price={1 - w_carbon:g}"))
    return problems


def region_score(intensity: float, max_intensity: float, spot_ratio: float, *, w_carbon: float = DEFAULT_W_CARBON,
                 w_price: float = DEFAULT_W_PRICE) -> float:
    """w_carbon * (1 - I / I_max) + w_price * (1 - spot / on_demand)."""
    carbon_term = 1.0 - intensity / max_intensity if max_intensity > 0 else 0.0
    return w_carbon * carbon_term + w_price * (1.0 - spot_ratio)


@dataclass(frozen=True)
class Candidate:
    """What is known about one candidate region when choosing."""

    zone: str
    intensity_g_per_kwh: float  # expected mean over the chosen window
    offer: Offer
    start: str = ""  # ISO start of the chosen window in that region
    intensity_now_g_per_kwh: float | None = None
    provenance: str = "estimated"
    source: str = ""


@dataclass(frozen=True)
class RegionScore:
    """A candidate with its score terms."""

    candidate: Candidate
    carbon_term: float
    price_term: float
    score: float

    def to_dict(self) -> dict[str, Any]:
        c = self.candidate
        return {"zone": c.zone, "start": c.start, "intensity_g_per_kwh": round(c.intensity_g_per_kwh, 3),
                "intensity_now_g_per_kwh": None if c.intensity_now_g_per_kwh is None
                else round(c.intensity_now_g_per_kwh, 3),
                "offer": c.offer.to_dict(), "carbon_term": round(self.carbon_term, 4),
                "price_term": round(self.price_term, 4), "score": round(self.score, 4),
                "provenance": c.provenance, "source": c.source}


def score_regions(candidates: Sequence[Candidate], *, w_carbon: float = DEFAULT_W_CARBON,
                  w_price: float = DEFAULT_W_PRICE) -> list[RegionScore]:
    """Score every candidate, best first (ties: lower intensity, then the order given)."""
    if not candidates:
        raise ConfigError(Problem("candidates", [], "no candidate regions to choose from",
                                  "give at least one zone, e.g. GB,DE-LU"))
    problems = check_weights(w_carbon, w_price)
    if problems:
        raise ConfigError(problems)
    i_max = max(c.intensity_g_per_kwh for c in candidates)
    scored = []
    for c in candidates:
        carbon_term = 1.0 - c.intensity_g_per_kwh / i_max if i_max > 0 else 0.0
        price_term = 1.0 - c.offer.spot_ratio
        scored.append(RegionScore(c, carbon_term, price_term, w_carbon * carbon_term + w_price * price_term))
    order = sorted(range(len(scored)), key=lambda i: (-scored[i].score, scored[i].candidate.intensity_g_per_kwh, i))
    return [scored[i] for i in order]


def parse_candidates(candidates: Any, key: str) -> list[str]:
    """'GB,DE-LU' or ['GB', 'DE-LU'] -> resolved shipped zone ids; every unknown zone is a Problem."""
    from greenstack.carbon import traces

    items = candidates.split(",") if isinstance(candidates, str) else list(candidates or [])
    names = [str(c).strip() for c in items if str(c).strip()]
    if not names:
        raise ConfigError(Problem(key, candidates, "empty candidate list: nothing to choose from",
                                  "give at least one zone, e.g. GB,DE-LU,US-CAL-CISO"))
    problems, zones = [], []
    for name in names:
        zone = traces.find_zone(name)
        if zone is None:
            err = traces.unknown_zone_error(name)
            problems += [Problem(key, name, f"unknown region: {p.reason}", p.fix) for p in err.problems]
        elif zone not in zones:
            zones.append(zone)
    if problems:
        raise ConfigError(problems)
    return zones


def choose_region(zones: Sequence[str], catalog: PriceCatalog, *, kind: str, start: datetime, duration_h: float,
                  slack_h: float = 0.0, w_carbon: float = 0.6, w_price: float = 0.4,
                  objective: str | float = "mean") -> tuple[list[RegionScore], list[str]]:
    """Score each candidate zone at its best window within the slack; returns (best first, notes)."""
    from greenstack.carbon.sources import make_source

    notes: list[str] = []
    candidates = []
    span = int(math.floor(slack_h + 1e-9)) + int(math.ceil(duration_h - 1e-9))
    for zone in zones:
        offer = catalog.offer(zone, kind)
        outlook = intensity_outlook(make_source("embedded", zone=zone), start, span)
        values = outlook.values(objective)
        choice = best_window(values, duration_h, latest_start_h=int(math.floor(slack_h + 1e-9)))
        when = start if choice.start_h == 0 else outlook.times[choice.start_h].to_pydatetime()
        notes += [f"{zone}: {n}" for n in outlook.notes]
        candidates.append(Candidate(zone, choice.cost / duration_h, offer, when.isoformat(),
                                    choice.cost_now / duration_h, outlook.provenance, outlook.source))
    return score_regions(candidates, w_carbon=w_carbon, w_price=w_price), notes
