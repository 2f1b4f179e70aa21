"""`greenstack pool create|request|settle|status|budget|log`: the shared carbon budget pool.

Exit codes: `pool request` 0 approved (also at a premium), 3 denied; `pool status` 1 when the tables
disagree with the audit log. User errors are ConfigError (exit 2, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from greenstack.cli._common import fmt, print_json, table_console
from greenstack.errors import ConfigError, Problem

EXIT_DENIED = 3
EXIT_TAMPERED = 1
POOL_DB_ENV = "GREENSTACK_POOL_DB"


def pool_db(value: str | None) -> str:
    """The pool database from --db or $GREENSTACK_POOL_DB; an SQLite path is checked before sqlite3 sees it."""
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

    db = pool_db(args.db)
    console = table_console()
    if args.command == "create":
        pool = CarbonPool.create(db, parse_participants(args.participant), premium_factor=args.premium)
        status = pool.status()
        if args.json:
            print_json(status)
        else:
            console.print(f"created pool in {status['db']}: {len(status['participants'])} participants, "
                          f"{status['total_kg']:g} kgCO2e, premium {status['premium_factor']:g}x")
        return 0
    pool = CarbonPool(db)
    if args.command == "request":
        decision = pool.request(args.participant, args.kg, run_id=args.run_id, zone=args.zone,
                                duration_h=args.duration_h, alternatives=None if args.no_alternatives else "default")
        if args.json:
            print_json(decision.to_dict())
        else:
            colour = {"approved": "green", "approved_premium": "yellow", "denied": "red"}[decision.status]
            text = decision.status.replace("_", " at a ")
            console.print(f"[{colour}]{text}[/]: {decision.requested_kg:g} kg for {decision.participant}, charged "
                          f"{decision.charged_kg:g} kg" + (f" (allocation {decision.allocation_id})"
                                                           if decision.allocation_id else ""))
            console.print(f"  why: {decision.reason}")
            for alt in decision.alternatives:
                from greenstack.ledger.pool import alternative_text

                console.print(f"  alternative: {alternative_text(alt)}")
        return 0 if decision.approved else EXIT_DENIED
    if args.command == "settle":
        out = pool.settle(args.id, args.kg)
        if args.json:
            print_json(out)
        else:
            console.print(f"settled allocation {out['allocation_id']} ({out['participant']}): measured "
                          f"{out['measured_kg']:g} kg, charged {out['charged_kg']:g} kg, released "
                          f"{out['released_kg']:g} kg of the reservation")
        return 0
    if args.command == "status":
        status = pool.status()
        if args.json:
            print_json(status)
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
            print_json(pool.status())
        else:
            console.print(f"budget of {name}: {kg:g} kgCO2e")
        return 0
    # log
    if args.out:
        path = pool.export_audit(args.out)
        result = pool.verify_audit()
        if args.json:
            print_json({"path": str(path), **result.to_dict()})
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
        table.add_row(p["name"], fmt(p["budget_kg"], 6), fmt(p["reserved_kg"], 6), fmt(p["settled_kg"], 6),
                      fmt(p["remaining_kg"], 6), str(p["approved"]), str(p["denied"]),
                      style="red" if p["remaining_kg"] < 0 else None)
    table_console().print(table)


