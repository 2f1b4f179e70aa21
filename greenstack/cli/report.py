"""`greenstack report tco|compare|html`: TCO, run comparison and HTML reports.

User errors are raised as ConfigError/DataError, which `greenstack.cli.main` prints without a
traceback (exit 2).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from greenstack.cli._common import fmt, print_json, prov, table_console
from greenstack.console import plural
from greenstack.errors import ConfigError, Problem


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
    table_console().print(f"wrote {out} (plots in {Path(args.run_dir) / 'plots'})")
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
        print_json(result.to_dict())
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
        row = [LINE_TITLES[key], fmt(fig.value)]
        if base is not None:
            s = result.savings[key]
            row += [fmt(base.lines[key].value), fmt(s["usd"]), fmt(s["percent"], 3) if s["percent"] is not None
                    else "—"]
        row += [prov(fig.provenance), fig.source]
        table.add_row(*row, style="bold" if key == "total_usd" else None)
    console = table_console()
    console.print(table)
    if result.measured:
        deltas = Table(title="measured differences (run vs baseline)", title_justify="left")
        for col in ("figure", "baseline", "run", "change", "provenance"):
            deltas.add_column(col, justify="right" if col in ("baseline", "run", "change") else "left")
        for key, d in result.measured.items():
            change = f"{d['percent']:+.3g} %" if d["percent"] is not None else fmt(d["delta"])
            deltas.add_row(key, fmt(d["baseline"]), fmt(d["run"]), change, prov(d["provenance"]))
        console.print(deltas)
    if result.roi is not None:
        roi, given = result.roi, result.roi["inputs"]
        table = Table(title="return on the savings (inputs, then result)", title_justify="left",
                      caption=roi["note"], caption_justify="left")
        for col in ("", "value", "source"):
            table.add_column(col, overflow="fold")
        table.add_row("one-off investment", f"{fmt(given['investment_usd'])} USD", "--investment-usd")
        table.add_row("saving per run", f"{fmt(given['saving_per_run_usd'])} USD",
                      f"{given['saving_source']} [{prov(given['saving_provenance'])}]")
        if given["runs_per_month"] is not None:
            table.add_row("runs per month", fmt(given["runs_per_month"]), "--runs-per-month")
            table.add_row("saving per month", f"{fmt(roi['monthly_saving_usd'])} USD", "saving per run x runs/month")
        never = "never (no saving)"
        table.add_row("break-even", never if roi["break_even_runs"] is None else
                      f"{fmt(roi['break_even_runs'])} runs ({roi['break_even_whole_runs']} whole)",
                      "investment / saving per run", style="bold")
        if given["runs_per_month"] is not None:
            table.add_row("break-even", never if roi["break_even_months"] is None else
                          f"{fmt(roi['break_even_months'])} months", "break-even runs / runs per month", style="bold")
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
        print_json(comparison.to_dict())
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
        table.add_row("*" if r.pareto else "", r.label, state, " ".join(r.overrides), fmt(r.metric),
                      fmt(v.get("carbon/total_kg_co2e")), fmt(v.get("energy/total_kwh")),
                      fmt(v.get("time/duration_s")), fmt(v.get("cost/energy_usd")),
                      style="bold green" if r.pareto else None)
    console = table_console()
    console.print(table)
    for note in comparison.notes:
        console.print(f"[yellow]note:[/] {note}")
    return 0


