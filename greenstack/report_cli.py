"""`greenstack report|pool|audit`: TCO, run comparison and HTML reports; the shared carbon pool; audit logs.

Each `run_*` takes the arguments after its command word and returns the exit code; user errors are raised
as ConfigError/DataError, which `greenstack.cli.main` prints without a traceback (exit 2).
Exit codes: `pool request` 0 approved (also at a premium), 3 denied; `audit verify` 0 intact, 1 broken.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from greenstack.console import plural
from greenstack.errors import ConfigError, Problem

EXIT_DENIED = 3
EXIT_TAMPERED = 1
POOL_DB_ENV = "GREENSTACK_POOL_DB"


def _console() -> Any:
    from greenstack.console import make_console

    return make_console(soft_wrap=False)


def _print_json(obj: Any) -> None:
    from greenstack.io import dumps

    sys.stdout.write(dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


_PROV_STYLE = {"measured": "green", "estimated": "yellow", "fallback": "red"}


def _prov(label: str) -> str:
    return f"[{_PROV_STYLE.get(label, 'white')}]{label}[/]" if label else ""


# -- report ---------------------------------------------------------------------------------------
def run_report(argv: list[str]) -> int:
    """`greenstack report tco|compare|html ...`."""
    parser = argparse.ArgumentParser(prog="greenstack report", description="cost, comparison and HTML reports")
    sub = parser.add_subparsers(dest="command", required=True)
    tco = sub.add_parser("tco", help="total cost of ownership of a run, optionally against a measured baseline")
    tco.add_argument("run_dir")
    tco.add_argument("--baseline", help="a measured baseline run dir: savings are run vs this run")
    tco.add_argument("--instance", help="cloud instance type to price (e.g. g5.xlarge); omit for on-prem")
    tco.add_argument("--region", help="cloud region of the instance (e.g. us-east-1)")
    tco.add_argument("--pricing", default="on_demand", choices=["on_demand", "on-demand", "spot"])
    tco.add_argument("--nodes", type=int, default=1, help="instances the run used (default 1)")
    tco.add_argument("--catalog", help="your own price catalog (JSON, same format as the shipped one)")
    tco.add_argument("--carbon-price", type=float, dest="carbon_price",
                     help="USD per tCO2e (default 190: US EPA 2023 social cost of carbon)")
    tco.add_argument("--dataset-gb", type=float, help="dataset size (default: measured from data.root/data.path)")
    tco.add_argument("--checkpoint-gb", type=float, help="checkpoint size (default: measured in the run dir)")
    tco.add_argument("--retention-months", type=float, default=1.0, help="how long data and checkpoints are kept")
    tco.add_argument("--storage-class", default="object", help="catalog storage class (object, block)")
    tco.add_argument("--storage-price", type=float, help="USD per GB-month (overrides the catalog)")
    tco.add_argument("--electricity-price", type=float, help="USD per kWh for on-prem energy (default: the run's)")
    tco.add_argument("--hardware-usd-per-hour", type=float, help="on-prem hardware cost per node-hour")
    tco.add_argument("--investment-usd", type=float, dest="investment_usd",
                     help="a one-off cost (USD) paid back by the saving vs --baseline: break-even runs/months")
    tco.add_argument("--runs-per-month", type=float, dest="runs_per_month",
                     help="how often the run is repeated (for break-even months)")
    tco.add_argument("--json", action="store_true", help="print JSON instead of a table")
    cmp_ = sub.add_parser("compare", help="compare runs or a multirun: table + Pareto plot")
    cmp_.add_argument("dirs", nargs="+", help="run dirs and/or multirun dirs")
    cmp_.add_argument("--metric", default="test/accuracy", help="figure to maximise (default test/accuracy)")
    cmp_.add_argument("--cost", default="carbon/total_kg_co2e", help="figure to minimise (default emissions)")
    cmp_.add_argument("--plot", help="where to write the Pareto plot (default: pareto.png in the multirun dir, "
                                     "else in the current directory)")
    cmp_.add_argument("--json", action="store_true")
    page = sub.add_parser("html", help="write report.html (self-contained, PNG plots) for a run")
    page.add_argument("run_dir")
    page.add_argument("--out", help="output file (default RUN_DIR/report.html)")
    args = parser.parse_args(argv)
    if args.command == "tco":
        return _report_tco(args)
    if args.command == "compare":
        return _report_compare(args)
    from greenstack.report.html import write_report

    out = write_report(args.run_dir, args.out)
    _console().print(f"wrote {out} (plots in {Path(args.run_dir) / 'plots'})")
    return 0


def _report_tco(args: argparse.Namespace) -> int:
    from greenstack.report.tco import (
        DEFAULT_CARBON_PRICE_USD_PER_T,
        LINE_ORDER,
        LINE_TITLES,
        TcoOptions,
        compare_tco,
        return_on_savings,
    )

    opts = TcoOptions(instance=args.instance, region=args.region, pricing=args.pricing.replace("-", "_"),
                      nodes=args.nodes, catalog=args.catalog,
                      carbon_price_usd_per_t=DEFAULT_CARBON_PRICE_USD_PER_T if args.carbon_price is None
                      else args.carbon_price,
                      dataset_gb=args.dataset_gb, checkpoint_gb=args.checkpoint_gb,
                      retention_months=args.retention_months, storage_class=args.storage_class,
                      storage_usd_per_gb_month=args.storage_price, electricity_usd_per_kwh=args.electricity_price,
                      hardware_usd_per_hour=args.hardware_usd_per_hour)
    if args.runs_per_month is not None and args.investment_usd is None:
        raise ConfigError(Problem("--runs-per-month", args.runs_per_month, "only used for a return on an investment",
                                  "also pass --investment-usd USD (and --baseline DIR)"))
    result = compare_tco(args.run_dir, args.baseline, opts)
    if args.investment_usd is not None:
        result.roi = return_on_savings(result, args.investment_usd, args.runs_per_month)
    if args.json:
        _print_json(result.to_dict())
        return 0
    from rich.table import Table

    base = result.baseline
    table = Table(title=f"TCO of {result.run.run} ({result.run.run_dir})", title_justify="left",
                  caption=_tco_caption(result.run.inputs), caption_justify="left")
    table.add_column("line")
    table.add_column("run (USD)", justify="right")
    if base is not None:
        table.add_column(f"baseline {base.run} (USD)", justify="right")
        table.add_column("saving (USD)", justify="right")
        table.add_column("saving %", justify="right")
    table.add_column("provenance")
    table.add_column("source", overflow="fold")
    for key in LINE_ORDER:
        fig = result.run.lines[key]
        row = [LINE_TITLES[key], _fmt(fig.value)]
        if base is not None:
            s = result.savings[key]
            row += [_fmt(base.lines[key].value), _fmt(s["usd"]), _fmt(s["percent"], 3) if s["percent"] is not None
                    else "—"]
        row += [_prov(fig.provenance), fig.source]
        table.add_row(*row, style="bold" if key == "total_usd" else None)
    console = _console()
    console.print(table)
    if result.measured:
        deltas = Table(title="measured differences (run vs baseline)", title_justify="left")
        for col in ("figure", "baseline", "run", "change", "provenance"):
            deltas.add_column(col, justify="right" if col in ("baseline", "run", "change") else "left")
        for key, d in result.measured.items():
            change = f"{d['percent']:+.3g} %" if d["percent"] is not None else _fmt(d["delta"])
            deltas.add_row(key, _fmt(d["baseline"]), _fmt(d["run"]), change, _prov(d["provenance"]))
        console.print(deltas)
    if result.roi is not None:
        roi, given = result.roi, result.roi["inputs"]
        table = Table(title="return on the savings (inputs, then result)", title_justify="left",
                      caption=roi["note"], caption_justify="left")
        for col in ("", "value", "source"):
            table.add_column(col, overflow="fold")
        table.add_row("one-off investment", f"{_fmt(given['investment_usd'])} USD", "--investment-usd")
        table.add_row("saving per run", f"{_fmt(given['saving_per_run_usd'])} USD",
                      f"{given['saving_source']} [{_prov(given['saving_provenance'])}]")
        if given["runs_per_month"] is not None:
            table.add_row("runs per month", _fmt(given["runs_per_month"]), "--runs-per-month")
            table.add_row("saving per month", f"{_fmt(roi['monthly_saving_usd'])} USD", "saving per run x runs/month")
        never = "never (no saving)"
        table.add_row("break-even", never if roi["break_even_runs"] is None else
                      f"{_fmt(roi['break_even_runs'])} runs ({roi['break_even_whole_runs']} whole)",
                      "investment / saving per run", style="bold")
        if given["runs_per_month"] is not None:
            table.add_row("break-even", never if roi["break_even_months"] is None else
                          f"{_fmt(roi['break_even_months'])} months", "break-even runs / runs per month", style="bold")
        console.print(table)
    return 0


def _tco_caption(inputs: dict[str, Any]) -> str:
    bits = [f"duration {inputs['duration_s']:.6g} s x {inputs['nodes']} node(s)"]
    if inputs.get("instance"):
        bits.append(f"{inputs['instance']} {inputs['region']} {inputs['pricing']} {inputs['usd_per_hour']:g} USD/h")
        bits.append(f"catalog: {inputs['catalog']}")
    bits.append(f"carbon price {inputs['carbon_price_usd_per_t']:g} USD/t")
    return "; ".join(bits)


def _report_compare(args: argparse.Namespace) -> int:
    from greenstack.report.compare import compare_runs, plot_pareto

    comparison = compare_runs(args.dirs, metric=args.metric, cost=args.cost)
    if args.plot:
        plot_path = Path(args.plot)
    elif len(args.dirs) == 1 and not (Path(args.dirs[0]) / "sustainability.json").is_file():
        plot_path = Path(args.dirs[0]) / "pareto.png"
    else:
        plot_path = Path("pareto.png")
    plot_pareto(comparison, plot_path)
    if args.json:
        _print_json(comparison.to_dict())
        return 0
    from rich.table import Table

    table = Table(title=f"{plural(len(comparison.rows), 'run')}: {comparison.metric} vs {comparison.cost}", title_justify="left",
                  caption=f"Pareto plot: {plot_path}  (* = Pareto-optimal: no run has both lower "
                          f"{comparison.cost} and higher {comparison.metric})", caption_justify="left")
    for col in ("", "run", "state", "overrides", comparison.metric, "kgCO2e", "kWh", "duration s", "energy USD"):
        table.add_column(col, justify="right" if col not in ("", "run", "state", "overrides") else "left",
                         overflow="fold")
    for r in comparison.rows:
        v = r.values
        state = r.state if r.state == "completed" else f"[red]{r.state}[/]"
        table.add_row("*" if r.pareto else "", r.label, state, " ".join(r.overrides), _fmt(r.metric),
                      _fmt(v.get("carbon/total_kg_co2e")), _fmt(v.get("energy/total_kwh")),
                      _fmt(v.get("time/duration_s")), _fmt(v.get("cost/energy_usd")),
                      style="bold green" if r.pareto else None)
    console = _console()
    console.print(table)
    for note in comparison.notes:
        console.print(f"[yellow]note:[/] {note}")
    return 0


# -- pool -----------------------------------------------------------------------------------------
def _db(value: str | None) -> str:
    db = value or os.environ.get(POOL_DB_ENV)
    if not db:
        raise ConfigError(Problem("--db", None, "no pool database given",
                                  f"--db FILE.sqlite or --db postgresql://..., or set {POOL_DB_ENV}"))
    if "://" not in db:  # an SQLite file: say what is wrong with the path rather than sqlite3's traceback
        path = Path(db).expanduser()
        if path.is_dir():
            raise ConfigError(Problem("--db", db, "is a directory", "give the pool's SQLite file, e.g. pool.sqlite"))
        if not path.parent.is_dir():
            raise ConfigError(Problem("--db", db, f"directory {path.parent} does not exist"))
        if path.is_file() and path.stat().st_size:
            with open(path, "rb") as f:
                if f.read(16) != b"SQLite format 3\x00":
                    raise ConfigError(Problem("--db", db, "not an SQLite database",
                                              "give the file `greenstack pool create` made"))
    return db


def run_pool(argv: list[str]) -> int:
    """`greenstack pool create|request|settle|status|budget|log ...`."""
    parser = argparse.ArgumentParser(prog="greenstack pool", description="a shared carbon budget pool")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_)
        p.add_argument("--db", help=f"SQLite file or postgresql:// URL (default ${POOL_DB_ENV})")
        p.add_argument("--json", action="store_true", help="print JSON")
        return p

    create = add("create", "create a pool with participants and budgets")
    create.add_argument("--participant", action="append", default=[], metavar="NAME=KG", required=True)
    create.add_argument("--premium", type=float, default=1.5, help="charge multiplier over fair share (default 1.5)")
    request = add("request", "request (reserve) kgCO2e for a participant; exit 0 approved, 3 denied")
    request.add_argument("--participant", required=True)
    request.add_argument("--kg", type=float, required=True)
    request.add_argument("--run-id", help="the run this reservation is for")
    request.add_argument("--zone", help="grid zone of the run, for alternatives when denied (default DE-LU)")
    request.add_argument("--duration-h", type=float, help="expected run length, for time-shift alternatives")
    request.add_argument("--no-alternatives", action="store_true", help="skip computing alternatives on denial")
    settle = add("settle", "replace a reservation by the measured emissions")
    settle.add_argument("--id", type=int, required=True, help="allocation id from `pool request`")
    settle.add_argument("--kg", type=float, required=True, help="measured kgCO2e")
    add("status", "budgets, reservations and settlements (exit 1 when the tables disagree with the audit log)")
    budget = add("budget", "add a participant or change its budget")
    budget.add_argument("--participant", required=True, metavar="NAME=KG")
    logp = add("log", "export the pool's hash-chained audit log as JSONL")
    logp.add_argument("--out", help="write to this file (plus FILE.head); default: print the lines")
    args = parser.parse_args(argv)
    from greenstack.ledger.pool import CarbonPool, parse_participants

    db = _db(args.db)
    console = _console()
    if args.command == "create":
        pool = CarbonPool.create(db, parse_participants(args.participant), premium_factor=args.premium)
        status = pool.status()
        if args.json:
            _print_json(status)
        else:
            console.print(f"created pool in {status['db']}: {len(status['participants'])} participants, "
                          f"{status['total_kg']:g} kgCO2e, premium {status['premium_factor']:g}x")
        return 0
    pool = CarbonPool(db)
    if args.command == "request":
        decision = pool.request(args.participant, args.kg, run_id=args.run_id, zone=args.zone,
                                duration_h=args.duration_h, alternatives=None if args.no_alternatives else "default")
        if args.json:
            _print_json(decision.to_dict())
        else:
            colour = {"approved": "green", "approved_premium": "yellow", "denied": "red"}[decision.status]
            text = decision.status.replace("_", " at a ")
            console.print(f"[{colour}]{text}[/]: {decision.requested_kg:g} kg for {decision.participant}, charged "
                          f"{decision.charged_kg:g} kg" + (f" (allocation {decision.allocation_id})"
                                                           if decision.allocation_id else ""))
            console.print(f"  why: {decision.reason}")
            for alt in decision.alternatives:
                from greenstack.ledger.allocation import _alt_text

                console.print(f"  alternative: {_alt_text(alt)}")
        return 0 if decision.approved else EXIT_DENIED
    if args.command == "settle":
        out = pool.settle(args.id, args.kg)
        if args.json:
            _print_json(out)
        else:
            console.print(f"settled allocation {out['allocation_id']} ({out['participant']}): measured "
                          f"{out['measured_kg']:g} kg, charged {out['charged_kg']:g} kg, released "
                          f"{out['released_kg']:g} kg of the reservation")
        return 0
    if args.command == "status":
        status = pool.status()
        if args.json:
            _print_json(status)
        else:
            _print_pool_status(status)
            if not status["integrity"]["ok"]:  # never show a forged budget without saying so
                console.print("[red]TAMPERED[/]: the tables disagree with the pool's audited history; the figures "
                              "above are NOT trustworthy:", soft_wrap=True)
                for problem in status["integrity"]["problems"]:
                    console.print(f"  {problem}", markup=False, soft_wrap=True)
        return 0 if status["integrity"]["ok"] else EXIT_TAMPERED
    if args.command == "budget":
        ((name, kg),) = parse_participants([args.participant]).items()
        pool.set_budget(name, kg)
        if args.json:
            _print_json(pool.status())
        else:
            console.print(f"budget of {name}: {kg:g} kgCO2e")
        return 0
    # log
    if args.out:
        path = pool.export_audit(args.out)
        result = pool.verify_audit()
        if args.json:
            _print_json({"path": str(path), **result.to_dict()})
        else:
            console.print(f"wrote {result.lines} records to {path} (+ {path.name}.head); chain "
                          + ("verifies" if result.ok else "DOES NOT verify"))
        return 0 if result.ok else EXIT_TAMPERED
    lines, _ = pool.audit_lines()
    sys.stdout.write("".join(line + "\n" for line in lines))
    return 0


def _print_pool_status(status: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"carbon pool {status['db']} (premium {status['premium_factor']:g}x over fair share)",
                  title_justify="left",
                  caption=f"pool: {status['used_kg']:.6g} of {status['total_kg']:.6g} kg used "
                          f"({status['reserved_kg']:.6g} reserved, {status['settled_kg']:.6g} settled), "
                          f"{status['remaining_kg']:.6g} kg free" +
                          (f", OVERDRAWN by {status['overdrawn_kg']:.6g} kg" if status["overdrawn_kg"] else "") +
                          f"; audit records: {status['audit']['records']}", caption_justify="left")
    for col in ("participant", "budget kg", "reserved kg", "settled kg", "remaining kg", "approved", "denied"):
        table.add_column(col, justify="left" if col == "participant" else "right")
    for p in status["participants"]:
        table.add_row(p["name"], _fmt(p["budget_kg"], 6), _fmt(p["reserved_kg"], 6), _fmt(p["settled_kg"], 6),
                      _fmt(p["remaining_kg"], 6), str(p["approved"]), str(p["denied"]),
                      style="red" if p["remaining_kg"] < 0 else None)
    _console().print(table)


# -- audit ----------------------------------------------------------------------------------------
def run_audit(argv: list[str]) -> int:
    """`greenstack audit verify|show PATH` (a JSONL audit log or a run dir), or `verify --db URL` for a pool."""
    parser = argparse.ArgumentParser(prog="greenstack audit", description="hash-chained decision logs")
    sub = parser.add_subparsers(dest="command", required=True)
    ver = sub.add_parser("verify", help="check a log's hash chain: exit 0 intact, 1 edited/inserted/deleted lines")
    ver.add_argument("path", nargs="?", help="audit.jsonl, or a run dir containing one")
    ver.add_argument("--db", help="verify a carbon pool's own log in its database instead")
    ver.add_argument("--no-head", action="store_true", help="accept a log without its .head file (tail deletions "
                                                            "then go undetected)")
    ver.add_argument("--json", action="store_true")
    show = sub.add_parser("show", help="print a log's decisions")
    show.add_argument("path")
    args = parser.parse_args(argv)
    from greenstack.ledger.audit import AuditLog, verify_run

    if args.command == "show":
        _readable_jsonl(_audit_path(args.path), records=True)
        records = AuditLog(_audit_path(args.path)).records()
        from rich.table import Table

        table = Table(title=str(_audit_path(args.path)), title_justify="left")
        for col in ("#", "at", "kind", "actor", "data"):
            table.add_column(col, overflow="fold")
        for r in records:
            table.add_row(str(r.get("seq")), str(r.get("at")), str(r.get("kind")), str(r.get("actor", "")),
                          json.dumps(r.get("data"), sort_keys=True))
        _console().print(table)
        return 0
    if args.db:
        from greenstack.ledger.pool import CarbonPool

        result = CarbonPool(_db(args.db)).verify_audit()
    elif args.path:
        _readable_jsonl(_audit_path(args.path), records=False)
        result = verify_run(_audit_path(args.path), require_head=not args.no_head)
    else:
        raise ConfigError(Problem("PATH", None, "give an audit log (or run dir), or --db URL for a pool's log"))
    if args.json:
        _print_json(result.to_dict())
    else:
        console = _console()
        if result.ok:
            console.print(f"[green]OK[/]: {result.path}: {result.lines} records, hash chain intact"
                          + (", head matches" if result.head_checked else "")
                          + (f", anchors match ({', '.join(result.anchors_checked)})" if result.anchors_checked
                             else "") + ("; keyed (HMAC)" if result.keyed else ""), soft_wrap=True)
        else:
            console.print(f"[red]TAMPERED[/]: {result.path}: {len(result.problems)} problem(s)")
            for p in result.problems:
                console.print(f"  {p.format()}", markup=False, soft_wrap=True)
        for note in result.notes:
            console.print(f"[yellow]note[/]: {note}", soft_wrap=True)
    return 0 if result.ok else EXIT_TAMPERED


def _readable_jsonl(path: Path, *, records: bool) -> None:
    """A log that is not UTF-8 text (or, to show it, not one JSON object a line): one clear error
    naming the line, not a UnicodeDecodeError/JSONDecodeError traceback."""
    for n, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(Problem(f"{path}:{n}", "", f"not UTF-8 text (byte {e.start}): not an audit log, "
                                                           "or damaged")) from None
        if records and line.strip():
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok:
                raise ConfigError(Problem(f"{path}:{n}", line[:60], "not a JSON record",
                                          "`greenstack audit verify` names tampered lines")) from None


def _audit_path(path: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / "audit.jsonl"
    if not p.is_file():
        raise ConfigError(Problem("PATH", str(path), "no audit log here", "give audit.jsonl or a run dir with one"))
    return p
