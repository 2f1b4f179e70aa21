"""Hour-by-hour emissions accounting against hand-computed values."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from greenstack.carbon.accounting import account_emissions, embodied_emissions_kg, project_total
from greenstack.carbon.sources import EmbeddedTraceSource, SeriesSource, StaticSource
from greenstack.errors import ConfigError

H = 3600.0
T10 = pd.Timestamp("2024-05-01T10:00:00Z").timestamp()  # 10:00 UTC


@pytest.fixture(scope="module")
def synthetic() -> SeriesSource:
    """08:00..15:00 with clearly different hourly values (g/kWh) and renewable shares (%)."""
    df = pd.DataFrame({"timestamp": pd.date_range("2024-05-01T08:00:00Z", periods=8, freq="h"),
                       "carbon_intensity": [50.0, 60.0, 100.0, 200.0, 300.0, 400.0, 500.0, 600.0],
                       "renewable_percent": [90.0, 80.0, 60.0, 40.0, 20.0, 10.0, 5.0, 0.0]})
    return SeriesSource(df, name="synthetic")


def test_interval_crossing_an_hour_splits_half_and_half(synthetic):
    r = account_emissions(np.array([T10 + 0.5 * H]), np.array([T10 + 1.5 * H]), np.array([1.0]), synthetic)
    # 0.5 kWh at 100 g/kWh (10:xx) + 0.5 kWh at 200 g/kWh (11:xx) = 150 g
    assert r.emissions_kg.tolist() == [pytest.approx(0.150)]
    assert r.intensity_g_per_kwh.tolist() == [pytest.approx(150.0)]
    assert r.renewable_percent.tolist() == [pytest.approx(50.0)]
    assert r.provenance == "measured" and r.source == "synthetic"


def test_power_series_over_several_hours(synthetic):
    start = np.array([T10 - 1.5 * H, T10 + 0.25 * H, T10 + 2.0 * H, T10 + 3.0 * H])
    end = np.array([T10 - 0.5 * H, T10 + 2.75 * H, T10 + 2.5 * H, T10 + 3.0 * H])
    energy = np.array([2.0, 5.0, 1.0, 0.4])
    r = account_emissions(start, end, energy, synthetic)
    # 08:30-09:30: half at 50, half at 60          -> 2.0 kWh x 55                  = 110 g
    # 10:15-12:45: 0.75 h at 100, 1 h at 200, 0.75 h at 300 (2.5 h) -> mean 200    -> 5.0 x 200 = 1000 g
    # 12:00-12:30: all in the 300 hour             -> 1.0 x 300                     = 300 g
    # 13:00 instant (zero length): 400             -> 0.4 x 400                     = 160 g
    np.testing.assert_allclose(r.intensity_g_per_kwh, [55.0, 200.0, 300.0, 400.0])
    np.testing.assert_allclose(r.emissions_kg, [0.110, 1.000, 0.300, 0.160])
    assert r.total_emissions_kg == pytest.approx(1.570)
    assert r.total_energy_kwh == pytest.approx(8.4)
    assert r.mean_intensity_g_per_kwh == pytest.approx(1570 / 8.4)
    # renewable: (2x85 + 5x(0.3x60 + 0.4x40 + 0.3x20) + 1x20 + 0.4x10) / 8.4
    assert r.mean_renewable_percent == pytest.approx((170 + 5 * 40 + 20 + 4) / 8.4)


def test_pue_multiplies_emissions_not_grid_intensity(synthetic):
    args = (np.array([T10]), np.array([T10 + 2 * H]), np.array([3.0]))
    base = account_emissions(*args, synthetic)
    r = account_emissions(*args, synthetic, pue=1.4)
    assert r.total_emissions_kg == pytest.approx(1.4 * base.total_emissions_kg)
    assert r.total_emissions_kg == pytest.approx(3.0 * 1.4 * 150 / 1000)
    assert r.mean_intensity_g_per_kwh == base.mean_intensity_g_per_kwh == pytest.approx(150.0)
    assert r.facility_energy_kwh == pytest.approx(4.2) and r.total_energy_kwh == 3.0
    assert "PUE 1.4" in r.source


def test_static_source_hand_values():
    src = StaticSource(400.0)
    r = account_emissions(np.array([0.0, 100.0, 5000.0]), np.array([100.0, 9000.0, 5000.0]),
                          np.array([0.5, 2.0, 0.0]), src, pue=1.2)
    np.testing.assert_allclose(r.emissions_kg, [0.5 * 400 * 1.2 / 1000, 2.0 * 400 * 1.2 / 1000, 0.0])
    assert r.provenance == "fallback" and r.source.startswith("static:400 g/kWh")
    assert np.isnan(r.mean_renewable_percent)


def test_provenance_is_the_weakest_of_energy_and_intensity(synthetic):
    one = (np.array([T10]), np.array([T10 + H]), np.array([1.0]))
    assert account_emissions(*one, synthetic, energy_provenance="estimated").provenance == "estimated"
    assert account_emissions(*one, StaticSource(100, measured=True)).provenance == "measured"
    gb = EmbeddedTraceSource("GB")
    future = pd.Timestamp("2026-02-01T00:00:00Z").timestamp()
    r = account_emissions(np.array([future]), np.array([future + 2 * H]), np.array([1.0]), gb)
    assert r.provenance == "estimated" and "replayed 2023" in r.source
    assert r.energy_kwh_by_provenance == {"estimated": pytest.approx(1.0)}


def test_matches_brute_force_on_random_intervals(synthetic):
    rng = np.random.default_rng(0)
    start = T10 - 2 * H + rng.uniform(0, 5 * H, 200)
    end = start + rng.uniform(0, 2.5 * H, 200)
    energy = rng.uniform(0, 3, 200)
    r = account_emissions(start, end, energy, synthetic, pue=1.1)
    hourly = dict(zip(np.arange(8) * H + T10 - 2 * H, [50, 60, 100, 200, 300, 400, 500, 600], strict=True))
    expected = []
    for s, e, kwh in zip(start, end, energy, strict=True):
        grams, h = 0.0, np.floor(s / H) * H
        while h < e:
            overlap = min(e, h + H) - max(s, h)
            grams += kwh * overlap / (e - s) * hourly[h]
            h += H
        expected.append(grams * 1.1 / 1000)
    np.testing.assert_allclose(r.emissions_kg, expected, rtol=1e-9)


def test_hundred_thousand_intervals_are_fast():
    gb = EmbeddedTraceSource("GB")
    n = 100_000
    start = pd.Timestamp("2023-03-01T00:00:00Z").timestamp() + np.arange(n) * 30.0
    t0 = time.perf_counter()
    r = account_emissions(start, start + 30.0, np.full(n, 0.002), gb)
    assert time.perf_counter() - t0 < 1.0
    assert len(r.emissions_kg) == n and r.total_energy_kwh == pytest.approx(200.0)
    assert 0 < r.mean_intensity_g_per_kwh < 400
    constant = account_emissions(start, start + 30.0, np.full(n, 0.002), StaticSource(250))
    assert constant.total_emissions_kg == pytest.approx(200.0 * 250 / 1000)


def test_bad_inputs_are_reported_together(synthetic):
    with pytest.raises(ConfigError) as info:
        account_emissions(np.array([0.0, 10.0]), np.array([5.0, 5.0]), np.array([-1.0, 1.0]), synthetic, pue=0.9)
    text = str(info.value)
    assert len(info.value.problems) == 3
    assert "end_s[1]" in text and "energy_kwh[0]" in text and "pue" in text
    with pytest.raises(ConfigError, match="same length"):
        account_emissions(np.array([0.0]), np.array([1.0, 2.0]), np.array([1.0]), synthetic)


def test_no_intervals():
    r = account_emissions(np.array([]), np.array([]), np.array([]), StaticSource(100))
    assert r.total_emissions_kg == 0.0 and len(r.emissions_kg) == 0


def test_embodied_emissions():
    # An accelerator with 150 kgCO2e embodied, 5-year life, used for 100 h.
    assert embodied_emissions_kg(100, 150.0, 5 * 8760) == pytest.approx(150.0 * 100 / 43800)
    np.testing.assert_allclose(embodied_emissions_kg(np.array([0.0, 43800.0]), 150.0, 43800.0), [0.0, 150.0])
    with pytest.raises(ConfigError, match="lifetime_hours"):
        embodied_emissions_kg(1, 150, 0)
    with pytest.raises(ConfigError, match="device_hours"):
        embodied_emissions_kg(-1, 150, 100)


def test_project_total_extrapolates_linearly():
    assert project_total(2.0, 1 / 10) == pytest.approx(20.0)  # first of 10 epochs took 2 kg
    assert project_total(7.5, 1.0) == 7.5
    with pytest.raises(ConfigError, match="progress_fraction"):
        project_total(1.0, 0.0)
    with pytest.raises(ConfigError, match="progress_fraction"):
        project_total(1.0, 1.5)
