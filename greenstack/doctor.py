"""`greenstack doctor`: what this machine can measure, and what will be estimated instead.

Users of other trackers discover a silent TDP fallback only when numbers look wrong; here every
meter and carbon source says up front whether it works and, if not, why and how to fix it.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from greenstack.carbon import traces
from greenstack.carbon.sources import country_table
from greenstack.energy import select_meters


def diagnose(meter: str = "auto", zone: str = "DE-LU") -> dict[str, Any]:
    """The machine's meters (used / not used with reasons) and carbon sources, as plain data."""
    from greenstack.carbon.sources import make_source
    from greenstack.errors import ConfigError

    meters, reasons = select_meters(meter)
    used = [{"name": m.name, "components": list(m.components), "provenance": m.provenance, "source": m.source}
            for m in meters]
    estimated = [m["source"] for m in used if m["provenance"] != "measured"]
    try:
        src = make_source("embedded", zone=zone)
        carbon = {"zone": zone, "source": src.name, "ok": True}
    except ConfigError as e:
        carbon = {"zone": zone, "ok": False, "error": str(e)}
    return {"meters": used, "not_used": reasons, "estimated": estimated, "carbon": carbon,
            "embedded_zones": traces.available_zones(), "country_averages": len(country_table())}


def run_doctor(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="greenstack doctor", description=__doc__)
    parser.add_argument("--meter", default="auto", choices=["auto", "nvml", "rapl", "tdp"])
    parser.add_argument("--zone", default="DE-LU", help="carbon zone to check (e.g. GB, US-CAL-CISO, FR)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    report = diagnose(args.meter, args.zone)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="energy meters on this machine", title_justify="left")
    for col in ("meter", "measures", "provenance", "source"):
        table.add_column(col, overflow="fold")
    for m in report["meters"]:
        style = "green" if m["provenance"] == "measured" else "yellow"
        table.add_row(m["name"], ", ".join(m["components"]), f"[{style}]{m['provenance']}[/]", m["source"])
    console.print(table)
    console.print("[bold]not used:[/]")
    for reason in report["not_used"]:
        console.print(f"  - {reason}", markup=False)
    if report["estimated"]:
        console.print("[yellow]will be estimated, not measured:[/] " + "; ".join(report["estimated"]))
    c = report["carbon"]
    console.print(f"[bold]carbon:[/] {c.get('source') if c['ok'] else c['error']}", markup=True)
    console.print(f"shipped hourly traces: {', '.join(report['embedded_zones'])}; "
                  f"annual averages for {report['country_averages']} countries")
    return 0
