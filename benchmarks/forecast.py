"""Day-1/2/3 MAPE of greenstack's 72 h forecaster vs seasonal-naive on all 12 shipped zones.

Fit on 2021-2022 (history), rolling daily origins (00:00 UTC) through 2023 with a daily refit on
everything observed before each origin. Prints the side-by-side table and a last `BENCH {json}` line.
Every model setting was chosen on 2022 with 2021 history, never on 2023. Times are wall-clock and
process CPU seconds (the CPU figure is less sensitive to other jobs sharing the machine).

    python -m benchmarks.forecast [--zones GB DE-LU ...] [--season-days 60]
"""

from __future__ import annotations

import argparse
import json
import time

import pandas as pd

from greenstack.carbon import forecast, traces
from greenstack.plan import print_eval_table

TARGET_RATIO = 0.7
EXEMPT_MAPE = 2.0  # IN-WE and SG: exempt when the model's day-1 MAPE is already below 2 %


def evaluate_zone(zone: str, season_days: float | None = forecast.DEFAULT_SEASON_DAYS) -> dict:
    series = forecast.hourly_series(traces.load_zone(zone))
    cpu0 = time.process_time()
    ev = forecast.rolling_evaluate(series, pd.Timestamp("2023-01-01", tz="UTC"),
                                   context=forecast.zone_context(zone), season_days=season_days)
    cpu = time.process_time() - cpu0
    m = ev.day_metrics()
    return {"trace": f"{zone} 2023", "zone": zone, "origins": len(ev.origins),
            "warmup_origins_skipped": ev.skipped_warmup, "mape": m["mape"], "mae": m["mae"],
            "interval": {"quantiles": [min(ev.quantiles), max(ev.quantiles)], "coverage": round(ev.coverage(), 3)},
            "seconds": round(ev.seconds, 2), "cpu_seconds": round(cpu, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--zones", nargs="*", default=traces.available_zones())
    parser.add_argument("--season-days", type=float, default=forecast.DEFAULT_SEASON_DAYS,
                        help="seasonal weighting of training origins (off by default; e.g. 60)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    results = [evaluate_zone(z, args.season_days) for z in args.zones]
    print_eval_table(results)
    ratios, meets = {}, {}
    print(f"\n{'zone':<13} {'day-1 MAPE model':>17} {'naive':>7} {'ratio':>6}  target <= {TARGET_RATIO}")
    for r in results:
        model, naive = r["mape"]["model"]["day1"], r["mape"]["naive"]["day1"]
        ratio = round(model / naive, 3)
        ratios[r["zone"]] = ratio
        ok = ratio <= TARGET_RATIO or (r["zone"] in ("IN-WE", "SG") and model < EXEMPT_MAPE)
        meets[r["zone"]] = ok
        note = "meets" if ratio <= TARGET_RATIO else ("exempt (< 2 %)" if ok else "misses")
        print(f"{r['zone']:<13} {model:>16.2f}% {naive:>6.2f}% {ratio:>6.3f}  {note}")
    print("BENCH " + json.dumps({
        "day1_mape_ratio": ratios, "max_ratio": max(ratios.values()),
        "max_ratio_non_exempt": max(v for z, v in ratios.items() if z not in ("IN-WE", "SG")),
        "day1_mape_model": {r["zone"]: r["mape"]["model"]["day1"] for r in results},
        "day1_mape_naive": {r["zone"]: r["mape"]["naive"]["day1"] for r in results},
        "zones_meeting_target": sum(meets.values()), "zones": len(results),
        "season_days": args.season_days, "max_zone_seconds": max(r["seconds"] for r in results),
        "max_zone_cpu_seconds": max(r["cpu_seconds"] for r in results), "total_seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
