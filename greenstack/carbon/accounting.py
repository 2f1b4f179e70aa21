"""Operational and embodied emissions of a run, hour by hour.

Why hourly: grid intensity can swing 3-5x within a day, so emissions = sum over hours of
(energy used in that hour) x (intensity of that hour) x PUE, not total energy x an annual average.
Energy intervals (e.g. power samples) that cross an hour boundary are split in proportion to time,
assuming constant power within an interval, and each part uses the intensity of its own hour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from greenstack.carbon.sources import IntensitySource
from greenstack.errors import ConfigError, Problem
from greenstack.provenance import PROVENANCES, Figure, Provenance, weakest

MAX_PARTS = 20_000_000  # interval pieces after splitting; beyond this, aggregate the energy first


@dataclass(frozen=True)
class EmissionsResult:
    """Emissions of a set of energy intervals; intensities are grid values (PUE not included)."""

    emissions_kg: np.ndarray  # per interval, kgCO2eq (includes PUE)
    intensity_g_per_kwh: np.ndarray  # per interval, time-weighted over the hours it spans
    renewable_percent: np.ndarray  # per interval, nan where the source does not know
    total_emissions_kg: float
    total_energy_kwh: float  # IT energy as given
    facility_energy_kwh: float  # total_energy_kwh x PUE
    mean_intensity_g_per_kwh: float  # energy-weighted
    mean_renewable_percent: float  # energy-weighted over intervals where known, else nan
    pue: float
    provenance: Provenance
    source: str
    energy_kwh_by_provenance: dict[str, float] = field(default_factory=dict)  # intensity label -> kWh

    def figures(self) -> dict[str, Figure]:
        """The headline numbers as Figures for reports and ledgers."""
        return {
            "emissions_kg": Figure(self.total_emissions_kg, "kgCO2eq", self.provenance, self.source),
            "energy_kwh": Figure(self.total_energy_kwh, "kWh", self.provenance, self.source),
            "intensity_g_per_kwh": Figure(self.mean_intensity_g_per_kwh, "gCO2eq/kWh", self.provenance,
                                          self.source),
        }

    def to_dict(self) -> dict[str, Any]:
        """Scalar summary (no per-interval arrays), JSON-serialisable."""
        return {
            "total_emissions_kg": self.total_emissions_kg, "total_energy_kwh": self.total_energy_kwh,
            "facility_energy_kwh": self.facility_energy_kwh,
            "mean_intensity_g_per_kwh": self.mean_intensity_g_per_kwh,
            "mean_renewable_percent": self.mean_renewable_percent, "pue": self.pue,
            "provenance": self.provenance, "source": self.source,
            "energy_kwh_by_provenance": dict(self.energy_kwh_by_provenance),
        }


def account_emissions(start_s: np.ndarray, end_s: np.ndarray, energy_kwh: np.ndarray, source: IntensitySource,
                      pue: float = 1.0, *, energy_provenance: str = "measured") -> EmissionsResult:
    """Emissions of energy used over [start_s, end_s) intervals (UTC epoch seconds), hour by hour.

    emissions_kg[i] = energy_kwh[i] x PUE x sum_h(share of interval i in slot h x intensity_h) / 1000,
    with slots at the source's resolution (hours for traces; none for constant sources). A
    zero-length interval uses the intensity at its instant. Provenance is the weakest of the
    intensity labels used and `energy_provenance`.
    """
    start = np.atleast_1d(np.asarray(start_s, dtype="float64"))
    end = np.atleast_1d(np.asarray(end_s, dtype="float64"))
    energy = np.atleast_1d(np.asarray(energy_kwh, dtype="float64"))
    _check_inputs(start, end, energy, pue, energy_provenance)
    n = len(start)
    if n == 0:
        empty = np.zeros(0)
        return EmissionsResult(empty, empty, empty, 0.0, 0.0, 0.0, float("nan"), float("nan"), float(pue),
                               weakest(energy_provenance), source.name, {})

    res = source.resolution_s
    if res is None or not np.isfinite(res) or res <= 0:
        parts_per = np.ones(n, dtype="int64")
        part_start, part_end, owner = start, end, np.arange(n)
    else:
        off = float(source.alignment_s)
        first = np.floor((start - off) / res)
        last = np.ceil((end - off) / res)
        parts_per = np.maximum(last - first, 1).astype("int64")
        total = int(parts_per.sum())
        if total > MAX_PARTS:
            raise ConfigError(Problem("energy intervals", f"{total} hour-slots",
                                      f"intervals span too many slots (> {MAX_PARTS})",
                                      "aggregate energy into intervals of at most a few hours first"))
        owner = np.repeat(np.arange(n), parts_per)
        offsets = np.cumsum(parts_per) - parts_per
        slot = np.repeat(first, parts_per) + (np.arange(total) - np.repeat(offsets, parts_per))
        part_start = np.maximum(start[owner], slot * res + off)
        part_end = np.minimum(end[owner], (slot + 1) * res + off)

    duration = end - start
    part_len = part_end - part_start
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(duration[owner] > 0, part_len / duration[owner], 1.0)
    lookup = source.series_at(part_start + part_len / 2.0)
    heads = np.cumsum(parts_per) - parts_per  # first part of each interval (parts are contiguous)

    intensity = np.add.reduceat(share * lookup.intensity_g_per_kwh, heads)
    renewable = np.add.reduceat(share * lookup.renewable_percent, heads)
    emissions = energy * pue * intensity / 1000.0

    total_energy = float(energy.sum())
    mean_intensity = float((energy * intensity).sum() / total_energy) if total_energy > 0 else float(np.mean(intensity))
    known = np.isfinite(renewable)
    known_energy = float(energy[known].sum())
    if known_energy > 0:
        mean_renewable = float((energy[known] * renewable[known]).sum() / known_energy)
    else:
        mean_renewable = float(np.mean(renewable[known])) if known.any() else float("nan")

    by_prov: dict[str, float] = {}
    part_energy = energy[owner] * share
    for label in np.unique(lookup.provenances):
        by_prov[str(label)] = float(part_energy[lookup.provenances == label].sum())

    src = lookup.source + (f"; PUE {pue:g}" if pue != 1.0 else "")
    return EmissionsResult(
        emissions_kg=emissions, intensity_g_per_kwh=intensity, renewable_percent=renewable,
        total_emissions_kg=float(emissions.sum()), total_energy_kwh=total_energy,
        facility_energy_kwh=total_energy * float(pue), mean_intensity_g_per_kwh=mean_intensity,
        mean_renewable_percent=mean_renewable, pue=float(pue),
        provenance=weakest(lookup.provenance, energy_provenance), source=src, energy_kwh_by_provenance=by_prov,
    )


def _check_inputs(start: np.ndarray, end: np.ndarray, energy: np.ndarray, pue: float, energy_provenance: str) -> None:
    problems: list[Problem] = []
    if not (len(start) == len(end) == len(energy)):
        raise ConfigError(Problem("intervals", (len(start), len(end), len(energy)),
                                  "start_s, end_s and energy_kwh must have the same length"))
    arrays = {"start_s": start, "end_s": end, "energy_kwh": energy}
    for key, bad, why in (
        ("start_s", ~np.isfinite(start), "not a finite time"),
        ("end_s", ~np.isfinite(end), "not a finite time"),
        ("end_s", np.isfinite(start) & np.isfinite(end) & (end < start), "interval ends before it starts"),
        ("energy_kwh", ~np.isfinite(energy) | (energy < 0), "energy must be finite and >= 0 kWh"),
    ):
        rows = np.flatnonzero(bad)
        if len(rows):
            more = f" ({len(rows)} rows, first {rows[:5].tolist()})" if len(rows) > 1 else ""
            problems.append(Problem(f"{key}[{rows[0]}]", float(arrays[key][rows[0]]), why + more))
    if not (np.isfinite(pue) and pue >= 1.0):
        problems.append(Problem("pue", pue, "PUE must be >= 1.0", "facility energy / IT energy; 1.0 = no overhead"))
    if energy_provenance not in PROVENANCES:
        problems.append(Problem("energy_provenance", energy_provenance, f"must be one of {PROVENANCES}"))
    if problems:
        raise ConfigError(problems)


def embodied_emissions_kg(device_hours: float | np.ndarray, embodied_kg_co2e: float | np.ndarray,
                          lifetime_hours: float | np.ndarray) -> float | np.ndarray:
    """Share of a device's manufacturing emissions used by a run: embodied x device_hours / lifetime.

    Why: linear amortisation over the service life is the usual convention (e.g. Green Algorithms,
    Boavizta); a run that occupies 1/10 000 of a GPU's life carries 1/10 000 of its embodied carbon.
    """
    hours = np.asarray(device_hours, dtype="float64")
    embodied = np.asarray(embodied_kg_co2e, dtype="float64")
    life = np.asarray(lifetime_hours, dtype="float64")
    problems = []
    if np.any(~np.isfinite(hours) | (hours < 0)):
        problems.append(Problem("device_hours", device_hours, "must be finite and >= 0"))
    if np.any(~np.isfinite(embodied) | (embodied < 0)):
        problems.append(Problem("embodied_kg_co2e", embodied_kg_co2e, "must be finite and >= 0"))
    if np.any(~np.isfinite(life) | (life <= 0)):
        problems.append(Problem("lifetime_hours", lifetime_hours, "must be > 0",
                                "e.g. 5 years x 8760 h = 43800"))
    if problems:
        raise ConfigError(problems)
    out = embodied * hours / life
    return float(out) if out.ndim == 0 else out


def project_total(emissions_so_far_kg: float, progress_fraction: float) -> float:
    """Projected emissions of the whole run by linear extrapolation (carbontracker-style).

    Why: carbontracker predicts the total after the first epoch as epoch emissions x epochs; with
    progress p = done / total work, that is emissions_so_far / p. Use it to stop or reschedule a run
    that would exceed its carbon budget.
    """
    problems = []
    if not (np.isfinite(emissions_so_far_kg) and emissions_so_far_kg >= 0):
        problems.append(Problem("emissions_so_far_kg", emissions_so_far_kg, "must be finite and >= 0"))
    if not (np.isfinite(progress_fraction) and 0.0 < progress_fraction <= 1.0):
        problems.append(Problem("progress_fraction", progress_fraction, "must be in (0, 1]",
                                "e.g. 1/epochs after the first epoch"))
    if problems:
        raise ConfigError(problems)
    return float(emissions_so_far_kg) / float(progress_fraction)
