"""Carbon-pool requests/s with an empty history and with 100,000 records, on SQLite and PostgreSQL.

A shared pool lives for years, so a request must cost the same whatever the history: the pool keeps
running balances (`greenstack_participants.used_mg`) instead of summing every allocation. The history
is filled in bulk (allocations, settlements and their hash-chained audit lines, one transaction), then
the same sequential `CarbonPool.request` loop is timed on it and on an empty pool, in alternating rounds
(best round of each); the ratio is the claim (target >= 0.8). PostgreSQL runs when GREENSTACK_TEST_PG_URL is set (a scratch database is created
and dropped). The filled pool must still pass `verify_audit` (chain + ledger), which is timed too.

    python -m benchmarks.pool [--records 100000] [--requests 60] [--rounds 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from greenstack.ledger.audit import GENESIS, audit_key, canonical, make_record
from greenstack.ledger.pool import CarbonPool, to_kg

TEAMS = [f"team-{i}" for i in range(8)]
BUDGET_KG = 1e6  # large enough that every timed request is approved at face value


def fill(pool: CarbonPool, records: int) -> float:
    """Append `records` allocations (every tenth settled) with their audit lines; returns seconds."""
    t0 = time.perf_counter()
    now = datetime.now(timezone.utc).isoformat()
    with pool._conn() as conn, pool._backend.write(conn):  # reads inside: one transaction
        seq, prev = pool._q(conn, "SELECT audit_seq, audit_hash FROM greenstack_pool WHERE id = 1")[0]
        first_id = int(pool._q(conn, "SELECT COALESCE(MAX(id), 0) + 1 FROM greenstack_allocations")[0][0])
        seq, prev = int(seq), str(prev) or GENESIS
        allocs: list[tuple[Any, ...]] = []
        lines: list[tuple[int, str]] = []
        used = dict.fromkeys(TEAMS, 0)
        key = audit_key()  # under GREENSTACK_AUDIT_KEY the history is keyed like the pool's own records
        for n in range(records):
            alloc_id, team, want = first_id + n, TEAMS[n % len(TEAMS)], 1000 + n % 997
            settle = n % 10 == 9  # a tenth settled: settlements are history records too
            measured = want // 2
            allocs.append((alloc_id, team, None, "settled" if settle else "reserved", want,
                           measured if settle else want, 1.0, measured if settle else None, now,
                           now if settle else None, "bulk history"))
            used[team] += measured if settle else want
            for kind, data in (("allocation", {
                    "allocation_id": alloc_id, "participant": team, "run_id": None, "decision": "approved",
                    "requested_kg": to_kg(want), "charged_kg": to_kg(want), "premium_factor": 1.5,
                    "reason": "bulk history"}),) + ((("settlement", {
                    "allocation_id": alloc_id, "participant": team, "run_id": None, "reserved_kg": to_kg(want),
                    "measured_kg": to_kg(measured), "premium_factor": 1.0, "charged_kg": to_kg(measured),
                    "released_kg": to_kg(want - measured)}),) if settle else ()):
                seq += 1
                record = make_record(seq, prev, kind, data, actor="greenstack.pool", key=key)
                prev = record["hash"]
                lines.append((seq, canonical(record)))
        insert_alloc = ("INSERT INTO greenstack_allocations (id, participant, run_id, status, requested_mg, "
                        "charged_mg, factor, settled_mg, created_at, settled_at, reason) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
        cur = conn.cursor()
        if pool._backend.kind == "postgresql":
            with cur.copy("COPY greenstack_allocations (id, participant, run_id, status, requested_mg, "
                          "charged_mg, factor, settled_mg, created_at, settled_at, reason) FROM STDIN") as copy:
                for row in allocs:
                    copy.write_row(row)
            with cur.copy("COPY greenstack_audit (seq, line) FROM STDIN") as copy:
                for row in lines:
                    copy.write_row(row)
        else:
            cur.executemany(insert_alloc, allocs)
            cur.executemany("INSERT INTO greenstack_audit (seq, line) VALUES (?, ?)", lines)
        for team, mg in used.items():
            pool._q(conn, "UPDATE greenstack_participants SET used_mg = used_mg + ? WHERE name = ?", (mg, team))
        pool._q(conn, "UPDATE greenstack_pool SET audit_seq = ?, audit_hash = ? WHERE id = 1", (seq, prev))
    return time.perf_counter() - t0


def requests_per_s(pool: CarbonPool, n: int) -> float:
    """n sequential approved requests, per second."""
    t0 = time.perf_counter()
    for i in range(n):
        pool.request(TEAMS[i % len(TEAMS)], 0.001, alternatives=None)
    return n / (time.perf_counter() - t0)


def measure(db_empty: str, db_full: str, records: int, n: int, rounds: int) -> dict[str, Any]:
    """Two pools, one with an empty history and one filled; timing rounds alternate between them so that
    the shared machine's drift hits both alike, and the best round of each is compared."""
    empty_pool = CarbonPool.create(db_empty, dict.fromkeys(TEAMS, BUDGET_KG))
    full_pool = CarbonPool.create(db_full, dict.fromkeys(TEAMS, BUDGET_KG))
    fill_s = fill(full_pool, records)
    for pool in (empty_pool, full_pool):
        requests_per_s(pool, 10)  # warm-up: imports, caches, connection setup paths
    empty, full = [], []
    for _ in range(rounds):
        empty.append(requests_per_s(empty_pool, n))
        full.append(requests_per_s(full_pool, n))
    t0 = time.perf_counter()
    status = full_pool.status()  # verifies the chain and the ledger against it (as `verify_audit` does)
    verify_s = time.perf_counter() - t0
    return {"rps_empty": round(max(empty), 1), "rps_full": round(max(full), 1),
            "ratio": round(max(full) / max(empty), 3), "history_records": records,
            "audit_records": status["audit"]["records"], "fill_s": round(fill_s, 2),
            "verify_s": round(verify_s, 2), "verify_ok": status["integrity"]["ok"]}


@contextmanager
def scratch_pg(url: str) -> Iterator[str]:
    import psycopg

    name = f"greenstack_bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000, help="history size for the second measurement")
    parser.add_argument("--requests", type=int, default=60, help="sequential requests per timing round")
    parser.add_argument("--rounds", type=int, default=6, help="alternating timing rounds per pool")
    parser.add_argument("--sqlite-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else None,
                        help="where the SQLite file lives (default: tmpfs, so that a disk's fsync latency does not "
                             "hide the per-request work this measures)")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.sqlite_dir) as tmp:
        out["sqlite"] = measure(os.path.join(tmp, "empty.sqlite"), os.path.join(tmp, "full.sqlite"), args.records,
                                args.requests, args.rounds)
    pg = os.environ.get("GREENSTACK_TEST_PG_URL")
    if pg:
        with scratch_pg(pg) as empty_url, scratch_pg(pg) as full_url:
            out["postgresql"] = measure(empty_url, full_url, args.records, args.requests, args.rounds)
    print(f"{'backend':<11} {'req/s empty':>12} {'req/s @' + format(args.records, ','):>16} {'ratio':>7} "
          f"{'fill s':>7} {'verify s':>9}")
    for backend, m in out.items():
        print(f"{backend:<11} {m['rps_empty']:>12.1f} {m['rps_full']:>16.1f} {m['ratio']:>7.3f} {m['fill_s']:>7.2f} "
              f"{m['verify_s']:>9.2f}" + ("" if m["verify_ok"] else "  VERIFY FAILED"))
    ratios = [m["ratio"] for m in out.values()]
    print("BENCH " + json.dumps({"records": args.records, "min_ratio": min(ratios),
                                 "median_ratio": statistics.median(ratios), **out}))


if __name__ == "__main__":
    main()
