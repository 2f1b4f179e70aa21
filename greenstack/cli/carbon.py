"""`greenstack carbon keygen|sign|verify|check|weather`: carbon-intensity data files and their inputs.

Why signatures: traces and ledgers are shared between teams and feed emissions reports; a detached
Ed25519 signature (FILE.sig) lets anyone with the public key confirm a file is exactly what was signed.
`weather` writes weather-forecast columns for the forecaster without look-ahead (see carbon/weather.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from greenstack.cli._common import ArgParser, help_exit
from greenstack.errors import ConfigError, Problem


def build_parser() -> argparse.ArgumentParser:
    """The `greenstack carbon` parser."""
    parser = ArgParser(prog="greenstack carbon", description="carbon-intensity data files: signatures, checks, weather columns")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgParser)
    p = sub.add_parser("keygen", help="create an Ed25519 key pair (KEY and KEY.pub)")
    p.add_argument("key", metavar="KEY", help="private key path to write (public key: KEY.pub unless --pub)")
    p.add_argument("--pub", default=None, help="public key path")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p = sub.add_parser("sign", help="write FILE.sig, a detached Ed25519 signature of FILE")
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--sig", default=None, help="signature path (default FILE.sig)")
    p = sub.add_parser("verify", help="check FILE against FILE.sig and a public key (exit 2 if tampered)")
    p.add_argument("--pub", required=True, help="Ed25519 public key (PEM)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--sig", default=None, help="signature path (default FILE.sig)")
    p = sub.add_parser("check", help="validate a trace CSV and flag spikes (rolling median +- k x MAD)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--k", type=float, default=6.0, help="MADs from the rolling median that count as a spike")
    p.add_argument("--window", type=int, default=25, help="rolling window in rows")
    p.add_argument("--repair", default=None, metavar="OUT", help="write a repaired canonical CSV here")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("weather", help="write weather-forecast columns (weather_<var>_d<K>, no look-ahead) from "
                                       "Open-Meteo's Previous Runs API to a CSV for the forecaster")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--zone", default=None, help="a shipped zone id (GB, DE-LU, US-CAL-CISO, ...) for its coordinates")
    where.add_argument("--lat", type=float, default=None, help="latitude in degrees (with --lon)")
    p.add_argument("--lon", type=float, default=None, help="longitude in degrees (with --lat)")
    p.add_argument("--from", dest="start", required=True, metavar="DATE", help="first UTC date (YYYY-MM-DD)")
    p.add_argument("--to", dest="end", required=True, metavar="DATE", help="last UTC date, inclusive")
    p.add_argument("--out", required=True, metavar="FILE", help="CSV to write (timestamp + weather_* columns)")
    p.add_argument("--variables", nargs="+", default=None, metavar="VAR",
                   help="Open-Meteo hourly variables (default: temperature_2m cloud_cover wind_speed_10m "
                        "shortwave_radiation)")
    p.add_argument("--lead-days", nargs="+", type=int, default=None, metavar="K",
                   help="runs issued K days before the valid time, 1..7 (default: 1 2 3 4, a 72 h horizon)")
    p.add_argument("--model", default=None, help="Open-Meteo model (default: the API's best_match)")
    p.add_argument("--cache-dir", default=None, help="response cache (default: $GREENSTACK_CACHE_DIR or "
                                                     "~/.cache/greenstack/carbon)")
    p.add_argument("--no-cache", action="store_true", help="always ask the API")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    return parser


def run_carbon(argv: list[str]) -> int:
    """Entry point of `greenstack carbon ...`; returns the exit code."""
    from greenstack.carbon import integrity

    parser = build_parser()
    if (code := help_exit(argv, parser.print_help)) is not None:
        return code
    args = parser.parse_args(argv)
    if args.command == "keygen":
        priv, pub = integrity.generate_keypair(args.key, args.pub, overwrite=args.force)
        print(f"wrote private key {priv} (keep it secret) and public key {pub}")
    elif args.command == "sign":
        sig = integrity.sign_file(args.file, args.key, args.sig)
        print(f"signed {args.file} -> {sig}")
    elif args.command == "verify":
        sig = integrity.verify_file(args.file, args.pub, args.sig)
        print(f"OK: {args.file} matches {sig}")
    elif args.command == "check":
        return _check(args)
    elif args.command == "weather":
        return _weather(args)
    return 0


def _check(args: argparse.Namespace) -> int:
    from greenstack.carbon import integrity, traces

    df = traces.load_csv_trace(args.file)
    repaired, report = integrity.repair_spikes(df, window=args.window, k=args.k)
    rows = report.rows()
    flagged = [{"row": r, "timestamp": df["timestamp"].iloc[r].strftime("%Y-%m-%dT%H:%M:%SZ"),
                "value": float(df["carbon_intensity"].iloc[r]), "median": round(float(report.median.iloc[r]), 2)}
               for r in rows]
    if args.repair:
        out = repaired.copy()
        out["timestamp"] = out["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        out.to_csv(Path(args.repair), index=False)
    if args.json:
        print(json.dumps({"file": args.file, "rows": len(df), "spikes": flagged, "repaired": args.repair}))
    else:
        print(f"{args.file}: {len(df)} rows valid; {len(rows)} spike(s) beyond {args.k:g} MAD")
        for f in flagged[:20]:
            print(f"  row {f['row']} {f['timestamp']}: {f['value']:g} g/kWh (rolling median {f['median']:g})")
        if args.repair:
            print(f"repaired copy (spikes -> rolling median, marked estimated): {args.repair}")
    return 0


# library argument names -> the flags a CLI user typed
_WEATHER_FLAGS = {"start": "--from", "end": "--to", "variables": "--variables", "lead_days": "--lead-days",
                  "latitude": "--lat", "longitude": "--lon", "model": "--model", "zone": "--zone"}


def _weather(args: argparse.Namespace) -> int:
    from greenstack.carbon import weather
    from greenstack.carbon.providers.cache import DiskCache

    if args.zone is None and (args.lat is None or args.lon is None):
        raise ConfigError(Problem("--zone/--lat/--lon", None, "no location",
                                  "give --zone ZONE (e.g. GB) or both --lat and --lon"))
    if args.zone is not None and args.lon is not None:
        raise ConfigError(Problem("--lon", args.lon, "--zone gives the coordinates", "give --zone or --lat/--lon"))
    variables = (weather.DEFAULT_VARIABLES if args.variables is None
                 else [v for item in args.variables for v in item.split(",") if v.strip()])
    kw: dict[str, Any] = {"variables": variables,
                          "lead_days": args.lead_days or weather.DEFAULT_LEAD_DAYS, "model": args.model,
                          "cache": None if args.no_cache else DiskCache(args.cache_dir)}
    try:
        n_chunks = len(weather.date_chunks(weather.as_date(args.start, "start"), weather.as_date(args.end, "end")))
    except ConfigError:
        n_chunks = 1  # the fetch reports the bad dates, with every other problem
    client = weather.make_client()
    try:
        with _ChunkProgress(n_chunks) as bar:
            kw["progress"] = bar.update
            if args.zone is not None:
                frame = weather.weather_for_zone(args.zone, args.start, args.end, client=client, **kw)
            else:
                frame = weather.fetch_previous_runs(args.lat, args.lon, args.start, args.end, client=client, **kw)
    except ConfigError as err:
        problems = [dataclasses.replace(p, key=_WEATHER_FLAGS.get(p.key, p.key)) for p in err.problems]
        raise type(err)(problems) from None
    finally:
        client.close()
    path = weather.write_csv(frame, args.out)
    summary = _weather_summary(frame, path, args.zone)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"wrote {path}: {summary['rows']} hourly rows ({summary['start']} .. {summary['end']}), "
          f"{len(summary['columns'])} weather columns, {summary['missing_share']:.1%} missing")
    place = f"zone {summary['zone']} at " if summary["zone"] else ""
    print(f"location: {place}{summary['latitude']:g}, {summary['longitude']:g}"
          + (f" (model grid cell {summary['grid_latitude']:g}, {summary['grid_longitude']:g})"
             if summary["grid_latitude"] is not None and summary["grid_longitude"] is not None else ""))
    if summary["empty_columns"]:
        print(f"warning: no data at all in {', '.join(summary['empty_columns'])}")
    if summary["first_with_data"] and summary["first_with_data"] != summary["start"]:
        print(f"note: first hour with data {summary['first_with_data']} (earlier rows are empty)")
    print(f"columns weather_<var>_d<K>: forecasts issued K days before the valid time (no look-ahead); "
          f"{summary['requests']} request(s), {summary['cache_hits']} from cache")
    print(f"source: {summary['source']}")
    return 0


def _weather_summary(frame: Any, path: Path, zone: str | None) -> dict[str, Any]:
    values = frame.to_numpy()
    has_data = frame.notna().any(axis=1)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    return {"out": str(path), "rows": len(frame), "columns": list(frame.columns),
            "start": frame.index[0].strftime(iso), "end": frame.index[-1].strftime(iso),
            "missing_share": round(float(frame.isna().to_numpy().sum() / values.size), 4) if values.size else 1.0,
            "empty_columns": [c for c in frame.columns if frame[c].isna().all()],
            "first_with_data": frame.index[has_data.to_numpy()][0].strftime(iso) if has_data.any() else None,
            "zone": frame.attrs.get("zone", zone), "latitude": frame.attrs.get("latitude"),
            "longitude": frame.attrs.get("longitude"), "grid_latitude": frame.attrs.get("grid_latitude"),
            "grid_longitude": frame.attrs.get("grid_longitude"), "model": frame.attrs.get("model"),
            "units": frame.attrs.get("units", {}), "requests": frame.attrs.get("requests"),
            "cache_hits": frame.attrs.get("cache_hits"), "source": frame.attrs.get("source")}


class _ChunkProgress:
    """A rich progress bar (on stderr, terminals only) over request chunks, when there is more than one."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._bar: Any = None

    def __enter__(self) -> _ChunkProgress:
        if self.total > 1:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            console = Console(stderr=True)
            if console.is_terminal:
                self._bar = Progress(TextColumn("[bold green]open-meteo"), BarColumn(), MofNCompleteColumn(),
                                     TimeRemainingColumn(), console=console, transient=True)
                self._bar.__enter__()
                self._task = self._bar.add_task("weather", total=self.total)
        return self

    def update(self, done: int, total: int) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
