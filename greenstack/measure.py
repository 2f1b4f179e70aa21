"""Energy and carbon configuration groups (`energy`, `carbon`) and the run's measurement policy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from greenstack.errors import ConfigError, Problem


@dataclass
class EnergyConfig:
    """Which meters to use and how often to sample them."""

    kind: Literal["auto", "nvml", "rapl", "tdp"] = "auto"
    interval_s: float = 1.0
    tdp_w: float | None = None
    default_tdp_w: float = 85.0
    ram_w_per_gb: float = 0.375
    idle_baseline_s: float = 0.0

    def __post_init__(self) -> None:
        problems = []
        if self.kind not in ("auto", "nvml", "rapl", "tdp"):
            problems.append(Problem("energy.kind", self.kind, "unknown meter kind", "auto, nvml, rapl or tdp"))
        if not self.interval_s > 0:
            problems.append(Problem("energy.interval_s", self.interval_s, "must be > 0"))
        if self.tdp_w is not None and not self.tdp_w > 0:
            problems.append(Problem("energy.tdp_w", self.tdp_w, "must be > 0 or null"))
        if not self.default_tdp_w > 0:
            problems.append(Problem("energy.default_tdp_w", self.default_tdp_w, "must be > 0"))
        if self.ram_w_per_gb < 0:
            problems.append(Problem("energy.ram_w_per_gb", self.ram_w_per_gb, "must be >= 0"))
        if self.idle_baseline_s < 0:
            problems.append(Problem("energy.idle_baseline_s", self.idle_baseline_s, "must be >= 0"))
        if problems:
            raise ConfigError(problems)


@dataclass
class CarbonConfig:
    """Where intensity comes from, plus accounting knobs (PUE, price, budget, embodied emissions)."""

    kind: Literal["embedded", "country", "static", "csv"] = "embedded"
    zone: str | None = "DE-LU"
    intensity_g_per_kwh: float | None = None
    path: str | None = None
    measured: bool = False
    pue: float = 1.0
    electricity_usd_per_kwh: float = 0.20
    budget_kg: float | None = None
    budget_action: Literal["warn", "stop"] = "warn"
    embodied_kg_co2e: float | None = None
    embodied_lifetime_hours: float = 35040.0

    def __post_init__(self) -> None:
        problems = []
        if not self.pue >= 1.0:
            problems.append(Problem("carbon.pue", self.pue, "PUE is a ratio >= 1.0"))
        if self.electricity_usd_per_kwh < 0:
            problems.append(Problem("carbon.electricity_usd_per_kwh", self.electricity_usd_per_kwh, "must be >= 0"))
        if self.budget_kg is not None and not self.budget_kg > 0:
            problems.append(Problem("carbon.budget_kg", self.budget_kg, "must be > 0 or null"))
        if self.budget_action not in ("warn", "stop"):
            problems.append(Problem("carbon.budget_action", self.budget_action, "must be warn or stop"))
        if self.embodied_kg_co2e is not None and self.embodied_kg_co2e < 0:
            problems.append(Problem("carbon.embodied_kg_co2e", self.embodied_kg_co2e, "must be >= 0 or null"))
        if not self.embodied_lifetime_hours > 0:
            problems.append(Problem("carbon.embodied_lifetime_hours", self.embodied_lifetime_hours, "must be > 0"))
        try:
            self.source()
        except ConfigError as e:
            problems.extend(e.problems)
        if problems:
            raise ConfigError(problems)

    def source(self):  # noqa: ANN201 - IntensitySource, imported lazily
        """The intensity source this config describes."""
        from greenstack.carbon.sources import make_source

        return make_source(self.kind, zone=self.zone, intensity_g_per_kwh=self.intensity_g_per_kwh,
                           path=self.path, measured=self.measured)
