"""Forecasts from every hour of a trace, as a scheduler would have seen them (for backtests).

Why not `CarbonForecaster.predict` per job: a backtest plans one job per hour, ~8760 forecasts per
zone-year; refitting for each would take hours. The greenstack forecaster is a direct ridge
regression per lead hour fitted from accumulated normal equations, so here one ridge bank per
*origin hour of day* (24 banks, as `CarbonForecaster` trains per origin hour) is refitted once per
`refit_every_h` (a day by default, one batched solve for all banks) on every origin whose whole
horizon was observed before the refit, and every hourly origin in between is forecast with the
latest fit. At 00:00 origins this reproduces `rolling_evaluate` exactly. Features come in monthly
chunks, so memory stays bounded for multi-year traces.

Tried and dropped (2022 validation, 2021 history): pooling origin hours into fewer banks, direct
models of window means, analog (nearest-trajectory) ensembles, other ridge penalties, seasonal
weighting of the training origins (`season_days`: lower capture in GB/ERCOT), a minimum expected
saving before waiting, a shorter planning look-ahead, blending the plan with seasonal-naive - none
improved the scheduling capture.

No look-ahead: the forecast from origin `a` uses observations strictly before `a` (the feature
design guarantees it) and weights/residuals fitted on targets strictly before the last refit <= a.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from greenstack.carbon import forecast as fc

CHUNK_H = 24 * 30


@dataclass
class ForecastMatrix:
    """Hourly forecasts for a set of arrival indices: rows = arrivals, columns = lead hours."""

    arrivals: np.ndarray  # series indices of the arrivals (origins)
    point: np.ndarray  # MAPE-optimal point forecast (as CarbonForecaster)
    mean: np.ndarray  # mean-unbiased forecast: prediction x recent mean of actual/predicted
    quantiles: dict[float, np.ndarray]
    naive: np.ndarray  # seasonal-naive: same hour of the most recent observed day
    valid: np.ndarray  # False for warm-up arrivals (not enough history to fit the model)


def _residual_stats(resid: np.ndarray, quantiles: Sequence[float],
                    band_miss: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """Per bank and lead hour: MAPE-optimal log shift, mean log-ratio and quantile log-offsets.

    `resid` is (banks, H, k) recent out-of-sample log-residuals (actual / predicted); the same
    statistics as `RidgeBank.mape_shift` / `quantile_offsets`, batched over banks.
    """
    n_b, h, k = resid.shape
    if k < 10:
        zeros = np.zeros((n_b, h))
        return zeros, zeros, np.zeros((n_b, len(quantiles), h))
    ratio = np.sort(np.exp(resid), axis=2)
    cw = np.cumsum(1.0 / ratio, axis=2)
    pos = np.minimum((cw < cw[..., -1:] / 2).sum(axis=2), k - 1)
    mape = np.log(np.take_along_axis(ratio, pos[..., None], axis=2)[..., 0])
    recent = resid[..., -fc.INTERVAL_WINDOW:]
    mean = np.log(np.mean(np.exp(recent), axis=2))
    miss = np.full((n_b, h), fc.BAND_MISS) if band_miss is None else band_miss
    q_off = fc.calibrated_quantiles(recent, quantiles, miss)
    return mape, mean, q_off


def rolling_forecasts(values: np.ndarray, start_s: int, first_arrival: int, *, horizon_h: int,
                      context: fc.ZoneContext | None = None, quantiles: Sequence[float] = fc.DEFAULT_QUANTILES,
                      refit_every_h: int = 24, last_arrival: int | None = None,
                      alpha: float = fc.DEFAULT_ALPHA, season_days: float | None = fc.DEFAULT_SEASON_DAYS,
                      exog: pd.DataFrame | None = None,
                      progress: Callable[[int, int], None] | None = None) -> ForecastMatrix:
    """Forecast `horizon_h` hours from every hour in [first_arrival, last_arrival) of an hourly series.

    `values` is the whole hourly series (history then trace), `start_s` its first hour (epoch seconds).
    Arrivals without enough earlier data to fit (warm-up) are marked invalid and get naive values.
    `exog`: weather-forecast columns indexed by UTC time (as a trace CSV's `weather_*` columns);
    lead-day suffixes are honoured as in `forecast.exog_lead_columns`.
    """
    y = np.asarray(values, dtype="float64")
    n = len(y)
    end = n if last_arrival is None else int(last_arrival)
    qs = tuple(sorted(quantiles))
    arrivals = np.arange(first_arrival, end, dtype="int64")
    n_a = len(arrivals)
    h_idx = np.arange(horizon_h)
    if exog is not None:
        grid = pd.date_range(pd.Timestamp(start_s, unit="s", tz="UTC"), periods=n, freq="h")
        exog = fc.align_exog(exog, grid, horizon_h)
    design = fc.Design(y, start_s, context or fc.ZoneContext(), horizon_h, exog, stats_until=first_arrival)
    banks = [fc.RidgeBank(horizon_h, design.n_features, alpha, 1.0, fc.RESIDUAL_WINDOW, season_days)
             for _ in range(24)]
    p = design.n_features
    weights = np.zeros((24, horizon_h, p))
    shift = np.zeros((24, horizon_h))
    mean_shift = np.zeros((24, horizon_h))
    q_off = np.zeros((24, len(qs), horizon_h))
    fitted = np.zeros(24, dtype=bool)

    out_point = np.empty((n_a, horizon_h))
    out_mean = np.empty((n_a, horizon_h))
    out_q = {q: np.empty((n_a, horizon_h)) for q in qs}
    valid = np.zeros(n_a, dtype=bool)
    # seasonal-naive for every arrival at once (needs a >= 24; earlier arrivals are invalid anyway)
    naive_idx = np.clip(arrivals[:, None] + h_idx[None, :] - 24 * (h_idx[None, :] // 24 + 1), 0, n - 1)
    naive = y[naive_idx]

    first_origin = fc.CONTEXT_H
    next_train = first_origin  # next origin index not yet added to a bank
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # chunk start -> (X, last) for its origins
    region0 = max(first_origin, first_arrival - horizon_h)

    def feats(lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Features of origins [lo, hi); origins >= region0 come from the chunk cache."""
        if hi <= lo:
            return np.empty((horizon_h, 0, p)), np.empty(0)
        if lo < region0:
            return design.features(np.arange(lo, hi))
        xs, ls = [], []
        c = region0 + ((lo - region0) // CHUNK_H) * CHUNK_H
        while c < hi:
            if c not in cache:
                for old in [k for k in cache if k < c - CHUNK_H]:
                    del cache[old]
                cache[c] = design.features(np.arange(c, min(c + CHUNK_H, n)))
            x, last = cache[c]
            a, b = max(lo, c) - c, min(hi, c + CHUNK_H) - c
            xs.append(x[:, a:b])
            ls.append(last[a:b])
            c += CHUNK_H
        return np.concatenate(xs, axis=1), np.concatenate(ls)

    def add(lo: int, hi: int) -> None:
        """Add origins [lo, hi) (whole horizons observed) to their hour-of-day banks."""
        for c0 in range(lo, hi, 2000):
            c1 = min(hi, c0 + 2000)
            x, last = feats(c0, c1)
            t = np.arange(c0, c1)
            y_t = design.targets(t, last)
            season = design.season_bucket(t)
            for b in np.unique(t % 24):
                sel = np.flatnonzero(t % 24 == b)
                banks[b].add(x[:, sel], y_t[:, sel], season[sel])

    def refit(at: int) -> None:
        idx = [b for b in range(24) if banks[b].count >= 1]
        if not idx:
            return
        doy = float(design.day_of_year(at))  # season weights centred on the refit's date
        eqs = [banks[b].normal_equations(doy) for b in idx]
        lhs = np.stack([e[0] for e in eqs])
        rhs = np.stack([e[1] for e in eqs])
        solved = np.linalg.solve(lhs, rhs[..., None])[..., 0]  # one batched solve for every bank
        for b, w, m in zip(idx, solved, lhs, strict=True):
            first = banks[b].weights is None
            banks[b].set_weights(w, m)
            weights[b] = w
            fitted[b] = True
            if first:  # leave-one-out residuals of the bank's recent origins seed the intervals
                t = np.arange(first_origin, next_train)
                t = t[t % 24 == b][-fc.RESIDUAL_WINDOW:]
                x, last = design.features(t)
                banks[b].seed_residuals(x, design.targets(t, last))
        lengths = {banks[b].residuals.shape[1] for b in idx}
        groups = [idx] if len(lengths) == 1 else [[b] for b in idx]
        for group in groups:
            mape, mean, qo = _residual_stats(np.stack([banks[b].residuals for b in group]), qs,
                                             np.stack([banks[b].band_miss for b in group]))
            shift[group], mean_shift[group], q_off[group] = mape, mean, qo

    block_starts = list(range(first_arrival, end, refit_every_h))
    for i, block in enumerate(block_starts):
        ready = block - horizon_h + 1  # origins t with t + horizon_h <= block have all targets observed
        if ready > next_train:
            add(next_train, ready)
            next_train = ready
            refit(block)
        b_end = min(block + refit_every_h, end)
        sel = slice(block - first_arrival, b_end - first_arrival)
        a = arrivals[sel]
        ok = (a >= first_origin) & np.array([banks[int(k)].count >= fc.MIN_TRAIN_ORIGINS and fitted[int(k)]
                                              for k in a % 24])
        valid[sel] = ok
        if ok.any():
            lo, hi = int(a[ok][0]), int(a[ok][-1]) + 1
            x, last = feats(lo, hi)
            rel = a[ok] - lo
            x, last = x[:, rel], last[rel]
            bk = a[ok] % 24
            rows = sel.start + np.flatnonzero(ok)
            pred = np.einsum("hnp,nhp->nh", x, weights[bk]) + last[:, None]
            out_point[rows] = np.exp(pred + shift[bk])
            out_mean[rows] = np.exp(pred + mean_shift[bk])
            for j, q in enumerate(qs):
                out_q[q][rows] = np.exp(pred + q_off[bk, j])
        bad = np.flatnonzero(~ok) + sel.start
        out_point[bad] = naive[bad]
        out_mean[bad] = naive[bad]
        for q in qs:
            out_q[q][bad] = naive[bad]
        if progress is not None:
            progress(i + 1, len(block_starts))
    return ForecastMatrix(arrivals, out_point, out_mean, out_q, naive, valid)
