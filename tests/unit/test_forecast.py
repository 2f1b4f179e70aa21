"""The 72 h forecaster: features without look-ahead, units, baseline, and that it beats seasonal-naive."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from greenstack.carbon import forecast as F
from greenstack.carbon import traces
from greenstack.errors import DataError


def _zone_series(zone: str, start: str, end: str) -> pd.Series:
    s = F.hourly_series(traces.load_zone(zone))
    return s[start:end]


def test_clear_sky_is_zero_at_night_and_peaks_near_local_solar_noon():
    day = pd.date_range("2023-06-21", periods=24, freq="h", tz="UTC")
    ghi = F.clear_sky_ghi(day.as_unit("s").asi8.astype(float), 51.5, 0.0)  # London
    assert ghi[0] == 0.0 and ghi[23] == 0.0
    assert int(np.argmax(ghi)) == 12
    assert 0.8 < ghi.max() < 1.1  # kW/m2 on a clear midsummer noon
    sydney = F.clear_sky_ghi(day.as_unit("s").asi8.astype(float), -33.9, 151.0)
    assert int(np.argmax(sydney)) in (1, 2)  # UTC+10: local noon ~02:00 UTC


def test_hourly_series_averages_sub_hourly_rows_and_rejects_duplicates():
    ts = pd.date_range("2024-01-01", periods=4, freq="30min", tz="UTC")
    s = F.hourly_series(pd.DataFrame({"timestamp": ts, "carbon_intensity": [100.0, 200.0, 300.0, 500.0]}))
    assert list(s.to_numpy()) == [150.0, 400.0]
    dup = pd.Series([1.0, 2.0], index=pd.DatetimeIndex([ts[0], ts[0]]))
    with pytest.raises(DataError, match="duplicated"):
        F.hourly_series(dup)


def test_values_in_lbs_per_mwh_are_rejected_with_the_conversion():
    with pytest.raises(DataError, match="lbs/MWh") as err:
        F.check_units(np.full(100, 1500.0))
    assert "0.4536" in str(err.value)
    F.check_units(np.full(100, 750.0))  # a coal-heavy grid in g/kWh is fine


def test_seasonal_naive_repeats_the_most_recent_observed_day():
    y = np.arange(100.0)
    naive = F.seasonal_naive(y, 48, 72)
    assert list(naive[:24]) == list(y[24:48])
    assert list(naive[24:48]) == list(y[24:48])  # day 2 and 3 also use the last observed day
    assert list(naive[48:]) == list(y[24:48])


def test_no_look_ahead_future_values_do_not_change_earlier_forecasts():
    s = _zone_series("GB", "2022-05-01", "2022-08-31")
    ev = F.rolling_evaluate(s, pd.Timestamp("2022-07-15", tz="UTC"), context=F.zone_context("GB"))
    cut = pd.Timestamp("2022-08-10", tz="UTC")
    tampered = s.copy()
    tampered[cut:] = tampered[cut:] * 3.0
    ev2 = F.rolling_evaluate(tampered, pd.Timestamp("2022-07-15", tz="UTC"), context=F.zone_context("GB"))
    before = ev.origins < cut
    assert before.sum() > 20
    np.testing.assert_allclose(ev.model[before], ev2.model[before])
    np.testing.assert_allclose(ev.naive[before], ev2.naive[before])
    assert not np.allclose(ev.model[~before], ev2.model[~before])


def test_beats_seasonal_naive_on_a_wind_driven_grid_out_of_sample():
    s = _zone_series("DE-LU", "2022-01-01", "2023-03-31")
    ev = F.rolling_evaluate(s, pd.Timestamp("2023-01-01", tz="UTC"), context=F.zone_context("DE-LU"))
    m = ev.day_metrics()
    assert m["mape"]["model"]["day1"] < 0.75 * m["mape"]["naive"]["day1"]
    assert m["mae"]["model"]["day1"] < m["mae"]["naive"]["day1"]
    assert set(m["mape"]["model"]) == {"day1", "day2", "day3"}
    assert 0.6 < ev.coverage() < 0.95  # the 10-90 % band holds about 80 % of hours
    assert np.all(ev.lower <= ev.upper)


def test_weather_forecast_columns_are_used_when_provided():
    rng = np.random.default_rng(1)
    idx = pd.date_range("2022-01-01", periods=24 * 200, freq="h", tz="UTC")
    wind = np.convolve(rng.standard_normal(len(idx) + 48), np.ones(48) / 7, mode="valid")[: len(idx)]
    daily = 40 * np.sin(2 * np.pi * idx.hour.to_numpy() / 24)
    y = pd.Series(300 + daily - 60 * wind, index=idx).clip(lower=50)
    exog = pd.DataFrame({"forecast_wind": wind}, index=idx)
    start = pd.Timestamp("2022-05-01", tz="UTC")
    without = F.rolling_evaluate(y, start).day_metrics()["mape"]["model"]["day2"]
    with_exog = F.rolling_evaluate(y, start, exog=exog).day_metrics()["mape"]["model"]["day2"]
    assert with_exog < 0.5 * without


def test_lead_day_columns_only_reach_leads_they_were_issued_before():
    names = ["weather_wind_d1", "weather_wind_d2", "weather_wind_d3", "weather_temp", "weather_cloud_d2"]
    pick = F.exog_lead_columns(names, 72)
    assert pick.shape == (72, 3)  # three variables: wind, temp, cloud
    # lead hour h+1 needs a run published before the origin: _d1 serves hours 1-19 (6 h publication margin)
    assert list(pick[[0, 18, 19, 42, 43, 66], 0]) == [0, 0, 1, 1, 2, 2]
    assert pick[67, 0] == len(names)  # hours 68-72 would need _d4: nothing (the zero column)
    assert set(pick[:, 1]) == {3}  # unsuffixed: a forecast the user vouches for at every lead
    # cloud made two days ahead serves lead hours 1-43, nothing later
    assert list(pick[[0, 42, 43], 2]) == [4, 4, len(names)]


def _wind_grid(days: int = 200):
    rng = np.random.default_rng(3)
    idx = pd.date_range("2022-01-01", periods=24 * days, freq="h", tz="UTC")
    wind = np.convolve(rng.standard_normal(len(idx) + 48), np.ones(48) / 7, mode="valid")[: len(idx)]
    y = pd.Series(300 + 40 * np.sin(2 * np.pi * idx.hour.to_numpy() / 24) - 60 * wind, index=idx).clip(lower=50)
    return idx, wind, y, rng


def test_a_day_one_forecast_column_helps_only_the_leads_it_was_published_for():
    idx, wind, y, rng = _wind_grid()
    start = pd.Timestamp("2022-05-01", tz="UTC")
    base = F.rolling_evaluate(y, start)
    exog = pd.DataFrame({"weather_wind_d1": wind}, index=idx)  # an exact forecast, but made one day ahead
    got = F.rolling_evaluate(y, start, exog=exog)

    def mape(ev, leads):
        return float(np.mean(np.abs(ev.model[:, leads] - ev.actual[:, leads]) / ev.actual[:, leads]))

    early, late = slice(0, 19), slice(19, 72)  # lead hours 1-19 may use _d1; later ones would see the future
    assert mape(got, early) < 0.5 * mape(base, early)
    assert mape(got, late) == pytest.approx(mape(base, late), rel=0.02)


def test_timezone_naive_weather_is_a_clear_error():
    idx, wind, y, _ = _wind_grid(60)
    naive = pd.DataFrame({"weather_wind": wind}, index=idx.tz_localize(None))
    with pytest.raises(DataError, match="timezone-aware"):
        F.CarbonForecaster().fit(y, exog=naive)


def test_exogenous_scaling_uses_history_only():
    idx, wind, y, _ = _wind_grid(60)
    a = pd.DataFrame({"weather_wind": wind}, index=idx)
    b = a.copy()
    b.iloc[24 * 40:] *= 50.0  # a different evaluated span must not rescale the inputs before it
    da = F.Design(y.to_numpy(), int(idx[0].timestamp()), F.ZoneContext(), 72, F.align_exog(a, idx, 72),
                   stats_until=24 * 40)
    db = F.Design(y.to_numpy(), int(idx[0].timestamp()), F.ZoneContext(), 72, F.align_exog(b, idx, 72),
                   stats_until=24 * 40)
    assert np.allclose(da.exog[: 24 * 40], db.exog[: 24 * 40])
    assert not np.allclose(da.exog[24 * 40:], db.exog[24 * 40:])


def test_predict_gives_ordered_quantiles_after_the_series_and_a_labelled_source():
    s = _zone_series("US-CAL-CISO", "2023-01-01", "2023-04-30")
    fc = F.CarbonForecaster(context=F.zone_context("US-CAL-CISO")).fit(s).predict()
    assert len(fc.point) == 72 and fc.times[0] == s.index[-1] + pd.Timedelta(hours=1)
    q = fc.quantiles
    assert np.all(q[0.1] <= q[0.5]) and np.all(q[0.5] <= q[0.9])
    assert np.all((fc.point > 0) & (fc.point < 2000))
    frame = fc.to_frame()
    assert {"timestamp", "carbon_intensity", "q10", "q50", "q90", "naive"} <= set(frame.columns)
    look = fc.to_source().series_at(fc.times[:3])
    assert look.provenance == "estimated" and "greenstack-forecast:US-CAL-CISO" in look.source


def test_too_short_trace_names_the_lags_and_suggests_history():
    s = _zone_series("GB", "2023-01-01", "2023-01-20")
    with pytest.raises(DataError, match="--history"):
        F.CarbonForecaster().fit(s)
    with pytest.raises(DataError, match="too short"):
        F.rolling_evaluate(s, s.index[0])


def test_zone_context_knows_shipped_zones_and_tolerates_unknown_ones():
    ctx = F.zone_context("DE")  # publisher alias
    assert ctx.zone == "DE-LU" and ctx.timezone == "Europe/Berlin" and ctx.country == "DE"
    assert F.zone_context("XX-UNKNOWN").lat is None
    cal = F.calendar_features(np.array([pd.Timestamp("2023-12-25T12:00Z").timestamp()]), ctx)
    assert cal["holiday"][0] == 1.0 and cal["weekday"][0] == 0


def test_season_weights_peak_at_the_origin_date_and_wrap_around_the_year():
    w = F.season_weights(5.0)  # 5 January
    assert w.shape == (F.SEASON_BUCKETS,) and int(np.argmax(w)) == 0
    assert w[-1] > w[F.SEASON_BUCKETS // 2]  # late December is nearer than July (circular distance)
    assert w.min() >= F.SEASON_FLOOR and w.max() <= F.SEASON_FLOOR + 1.0
    np.testing.assert_allclose(F.season_weights(5.0, None), np.ones(F.SEASON_BUCKETS))


def test_season_weighted_ridge_follows_the_relation_of_the_origins_season():
    """Two seasons with opposite slopes: the fit for a winter origin must lean to the winter slope."""
    rng = np.random.default_rng(0)
    n = 400
    x = np.stack([np.ones(n), rng.standard_normal(n)], axis=1)[None]  # (H=1, n, p=2)
    winter = np.arange(n) % 2 == 0
    y = np.where(winter, 1.0, -1.0) * x[0, :, 1]
    buckets = np.where(winter, 0, F.SEASON_BUCKETS // 2)  # early January vs early July
    bank = F.RidgeBank(1, 2, 0.0, 1.0, 10, season_days=F.SEASON_SIGMA_DAYS)
    bank.add(x, y[None], buckets)
    bank.solve(5.0)
    assert bank.weights[0, 1] > 0.8
    bank.solve(190.0)
    assert bank.weights[0, 1] < -0.8
    flat = F.RidgeBank(1, 2, 0.0, 1.0, 10, season_days=None)
    flat.add(x, y[None], buckets)
    flat.solve(5.0)
    expected = np.linalg.lstsq(x[0], y, rcond=None)[0]
    np.testing.assert_allclose(flat.weights[0], expected, atol=1e-9)  # unweighted: plain least squares
