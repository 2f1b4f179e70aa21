"""`greenstack doctor`: what this machine can measure, and what will be estimated instead.

Users of other trackers discover a silent TDP fallback only when numbers look wrong; here every
meter and carbon source says up front whether it works and, if not, why and how to fix it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from typing import Any

import httpx

from greenstack.carbon import traces
from greenstack.carbon.sources import country_table
from greenstack.energy import select_meters

PROBE_TIMEOUT_S = 5.0


def probe_live_providers(zone: str = "DE-LU", *, env: Mapping[str, str] | None = None,
                         transport: httpx.BaseTransport | None = None) -> list[dict[str, Any]]:
    """For each live provider: are its credentials in the environment, and does one call with them work?

    Only providers whose credentials are set are called (one short request, no retries); the report
    names the environment variables, never their values, and errors are redacted.
    """
    import os

    from greenstack.carbon.providers import PROVIDERS
    from greenstack.carbon.providers.http import redact

    env = os.environ if env is None else env
    out: list[dict[str, Any]] = []
    for name, cls in PROVIDERS.items():
        item: dict[str, Any] = {"name": name, "key_env": list(cls.key_env)}
        if not cls.key_env:
            out.append({**item, "key_present": None, "checked": False,
                        "note": "needs no key; used with carbon=" + name})
            continue
        provider = cls(zone if name == "electricitymaps" else "CAISO_NORTH", env=env, transport=transport,
                       timeout_s=PROBE_TIMEOUT_S, retries=1)
        missing = provider.missing_credentials()
        if missing:
            out.append({**item, "key_present": False, "checked": False, "note": missing})
            continue
        try:
            if name == "watttime":
                provider.login()  # checks the credentials; the data call needs a licensed region
            else:
                now = time.time()
                provider.fetch(provider.requests_for(now - 3600, now, now)[0])
            out.append({**item, "key_present": True, "checked": True, "ok": True, "error": None})
        except Exception as e:  # a probe reports every failure instead of raising
            out.append({**item, "key_present": True, "checked": True, "ok": False,
                        "error": redact(f"{type(e).__name__}: {e}", provider.secrets())})
        finally:
            provider.client.close()
    return out


def diagnose(meter: str = "auto", zone: str = "DE-LU", *, env: Mapping[str, str] | None = None,
             transport: httpx.BaseTransport | None = None) -> dict[str, Any]:
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
            "live_providers": probe_live_providers(zone, env=env, transport=transport),
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
    from rich.table import Table

    from greenstack.console import make_console

    console = make_console()
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
    for p in report["live_providers"]:
        if not p["checked"]:
            console.print(f"  live {p['name']}: not checked ({p['note']})", markup=False, soft_wrap=True)
        elif p["ok"]:
            console.print(f"  live {p['name']}: [green]works[/] (key from {' + '.join(p['key_env'])})", soft_wrap=True)
        else:
            console.print(f"  live {p['name']}: [red]key set but the call failed[/]: {p['error']}", soft_wrap=True)
    console.print(f"shipped hourly traces: {', '.join(report['embedded_zones'])}; "
                  f"annual averages for {report['country_averages']} countries")
    return 0
