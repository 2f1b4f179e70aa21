"""`greenstack audit verify|show PATH`: check or print a hash-chained decision log.

Exit codes: `audit verify` 0 intact, 1 edited/inserted/deleted lines; unreadable input is a
ConfigError (exit 2, no traceback).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from greenstack.cli._common import print_json, table_console
from greenstack.errors import ConfigError, Problem

EXIT_TAMPERED = 1


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
        table_console().print(table)
        return 0
    if args.db:
        from greenstack.cli.pool import pool_db
        from greenstack.ledger.pool import CarbonPool

        result = CarbonPool(pool_db(args.db)).verify_audit()
    elif args.path:
        _readable_jsonl(_audit_path(args.path), records=False)
        result = verify_run(_audit_path(args.path), require_head=not args.no_head)
    else:
        raise ConfigError(Problem("PATH", None, "give an audit log (or run dir), or --db URL for a pool's log"))
    if args.json:
        print_json(result.to_dict())
    else:
        console = table_console()
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
