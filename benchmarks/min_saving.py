"""How much expected saving should `scheduler=forecast_window` require before it waits? (`min_saving_pct`)

A job of the forecast_window defaults (1 h, deadline 24 h, so 23 h slack, objective mean, no
re-planning) arrives at every hour of a year on each shipped zone. At arrival greenstack plans on
its rolling 72 h forecast exactly as the policy does; the plan's *expected* saving (on the forecast)
is what `min_saving_pct` compares against, the *realised* saving is the same window scored on the
actual intensity. With a threshold T a job waits only when its expected saving is >= T (otherwise it
starts at arrival: 0 % saved, 0 h waited). For each T the script prints the mean realised saving over
all jobs, the hours waited per job, the saving per hour waited, and, for the waits whose expected
saving is in [T, T + 1) (the marginal waits T lets through), how much they realise and how often
they lose (realise < 0).

The default is chosen on 2022 (fit 2021) and checked on 2023 (fit 2021-22), never on the year it
is reported on. Forecast error alone does not argue for a threshold (pooled over zones, even the
waits expected to save < 1 % realise about what they expected), but waiting has a cost to the user:
every low-expectation wait holds a job for hours for a small gain. So the default is the largest T
that keeps at least 95 % of the saving of waiting whenever anything is expected (T = 0), averaged
over zones: the hours of waiting it removes are the ones that bought the least. Prints the table
and one `BENCH {json}` line.

    python -m benchmarks.min_saving [--zones GB DE-LU ...] [--choose-year 2022] [--check-year 2023]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd

from greenstack.carbon import forecast, traces
from greenstack.scheduling import windows
from greenstack.scheduling.backtest import BacktestConfig, forecasts_for

THRESHOLDS = tuple(float(t) for t in np.arange(0.0, 15.5, 0.5))
#: the default keeps at least this share of the saving of T = 0 (mean over zones)
KEEP_SAVING_SHARE = 0.95


def expected_and_realised(zone: str, year: int, cfg: BacktestConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per job arriving in `year`: (expected saving %, realised saving %, planned wait h)."""
    series = forecast.hourly_series(traces.load_zone(zone))
    series = series[series.index < pd.Timestamp(f"{year + 1}-01-01", tz="UTC")]
    start_s = int(series.index[0].timestamp())
    first = int((pd.Timestamp(f"{year}-01-01", tz="UTC").timestamp() - start_s) // 3600)
    y = series.to_numpy()
    fm = forecasts_for(y, start_s, first, cfg, context=forecast.zone_context(zone), replan=False)
    last = len(y) - cfg.window_h + 1
    keep = fm.valid[: last - first]
    arrivals = fm.arrivals[: last - first][keep]
    plan = windows.planning_values(fm.point, fm.quantiles, objective=cfg.objective, mean=fm.mean)
    plan = plan[: last - first][keep]
    n_plan = min(cfg.slack_h, cfg.planned_h - cfg.span_h) + 1
    plan_costs = windows.window_costs(plan, cfg.duration_h)[:, :n_plan]
    starts = windows.choose_starts(plan, cfg.duration_h, n_plan)
    rows = np.arange(len(arrivals))
    expected = 100.0 * (plan_costs[:, 0] - plan_costs[rows, starts]) / plan_costs[:, 0]
    actual = y[arrivals[:, None] + np.arange(cfg.window_h)[None, :]]
    costs = windows.window_costs(actual, cfg.duration_h)
    realised = 100.0 * (costs[:, 0] - costs[rows, starts]) / costs[:, 0]
    return expected, realised, starts.astype(float)


def sweep(expected: np.ndarray, realised: np.ndarray, wait_h: np.ndarray) -> list[dict]:
    out = []
    for t in THRESHOLDS:
        waits = (expected >= t) & (wait_h > 0)
        marginal = waits & (expected < t + 1.0)
        out.append({
            "min_saving_pct": t,
            "saving_pct": float(np.where(waits, realised, 0.0).mean()),
            "wait_h_per_job": float(np.where(waits, wait_h, 0.0).mean()),
            "marginal_jobs": int(marginal.sum()),
            "marginal_expected_pct": float(expected[marginal].mean()) if marginal.any() else None,
            "marginal_realised_pct": float(realised[marginal].mean()) if marginal.any() else None,
            "marginal_losing_share": float((realised[marginal] < 0).mean()) if marginal.any() else None,
        })
    return out


def pooled(per_zone: dict[str, list[dict]]) -> list[dict]:
    """Each zone weighs the same: the mean of every column over zones (marginal columns over zones that have some)."""
    rows = []
    for i, t in enumerate(THRESHOLDS):
        row: dict = {"min_saving_pct": t}
        for key in ("saving_pct", "wait_h_per_job", "marginal_expected_pct", "marginal_realised_pct",
                    "marginal_losing_share"):
            vals = [z[i][key] for z in per_zone.values() if z[i][key] is not None]
            row[key] = float(np.mean(vals)) if vals else None
        row["marginal_jobs"] = sum(z[i]["marginal_jobs"] for z in per_zone.values())
        rows.append(row)
    return rows


def choose(rows: list[dict]) -> float:
    """The largest threshold whose mean realised saving keeps KEEP_SAVING_SHARE of the saving at T = 0."""
    floor = KEEP_SAVING_SHARE * rows[0]["saving_pct"]
    return max(row["min_saving_pct"] for row in rows if row["saving_pct"] >= floor)


def year_table(zones: list[str], year: int, cfg: BacktestConfig) -> list[dict]:
    per_zone = {}
    for zone in zones:
        t0 = time.perf_counter()
        per_zone[zone] = sweep(*expected_and_realised(zone, year, cfg))
        print(f"  {zone} {year}: {time.perf_counter() - t0:.1f} s", flush=True)
    return pooled(per_zone)


def print_table(rows: list[dict], title: str) -> None:
    print(f"\n{title}")
    print(f"{'T %':>5} {'saved %':>8} {'wait h':>7} {'%/h':>6} {'marg. exp %':>11} {'marg. real %':>12} "
          f"{'marg. lose':>10} {'jobs':>6}")
    for r in rows:
        per_h = r["saving_pct"] / r["wait_h_per_job"] if r["wait_h_per_job"] else float("nan")
        fmt = (lambda v, spec: format(v, spec) if v is not None else "-")  # noqa: E731
        print(f"{r['min_saving_pct']:>5.1f} {r['saving_pct']:>8.2f} {r['wait_h_per_job']:>7.2f} {per_h:>6.2f} "
              f"{fmt(r['marginal_expected_pct'], '>11.2f')} {fmt(r['marginal_realised_pct'], '>12.2f')} "
              f"{fmt(r['marginal_losing_share'], '>10.2f')} {r['marginal_jobs']:>6}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zones", nargs="*", default=traces.available_zones())
    parser.add_argument("--choose-year", type=int, default=2022)
    parser.add_argument("--check-year", type=int, default=2023)
    args = parser.parse_args()
    cfg = BacktestConfig(duration_h=1.0, slack_h=23, objective="mean")
    t0 = time.perf_counter()
    chosen_rows = year_table(args.zones, args.choose_year, cfg)
    chosen = choose(chosen_rows)
    check_rows = year_table(args.zones, args.check_year, cfg)
    print_table(chosen_rows, f"{args.choose_year} (choosing): 1 h job, deadline 24 h, mean over {len(args.zones)} zones")
    print_table(check_rows, f"{args.check_year} (checking)")
    at = {r["min_saving_pct"]: r for r in check_rows}
    zero, pick = at[0.0], at[chosen]
    print(f"\nchosen min_saving_pct = {chosen:g} (on {args.choose_year}); on {args.check_year} it keeps "
          f"{pick['saving_pct']:.2f} of {zero['saving_pct']:.2f} % saved with {pick['wait_h_per_job']:.2f} h "
          f"instead of {zero['wait_h_per_job']:.2f} h waited per job")
    print("BENCH " + json.dumps({
        "duration_h": cfg.duration_h, "slack_h": cfg.slack_h, "objective": cfg.objective, "zones": args.zones,
        "chosen_min_saving_pct": chosen, "chosen_on": args.choose_year, "checked_on": args.check_year,
        "criterion": {"keeps_share_of_saving_at_0": KEEP_SAVING_SHARE},
        "check": {"saving_pct_at_0": round(zero["saving_pct"], 3), "wait_h_at_0": round(zero["wait_h_per_job"], 3),
                  "saving_pct_at_chosen": round(pick["saving_pct"], 3),
                  "wait_h_at_chosen": round(pick["wait_h_per_job"], 3),
                  "marginal_realised_pct_at_chosen": pick["marginal_realised_pct"],
                  "marginal_losing_share_at_chosen": pick["marginal_losing_share"]},
        "total_seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
