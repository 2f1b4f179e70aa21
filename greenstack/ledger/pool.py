"""A shared carbon pool: teams hold budgets (kgCO2e) in one ledger; runs reserve, then settle what they emitted.

Why a database: several teams' jobs allocate from the same pool at the same moment, from different
processes and machines, and the pool must never hand out more than it holds. Every allocation runs in one
write transaction that first takes the pool's lock — `BEGIN IMMEDIATE` on SQLite (the default: a file
path), `SELECT ... FOR UPDATE` on the pool row on PostgreSQL (a `postgresql://` URL) — then reads the
balances, decides, writes the allocation and appends the decision to the pool's hash-chained audit log
(stored in the same database, so the log and the ledger can never disagree). Lock timeouts and
serialization failures are retried.

Why running balances: each participant's charged total (`used_mg`) is kept up to date by every
allocation and settlement, so a request reads a handful of rows whatever the pool's history (a shared
pool lives for years). The tables are checked against the audited history by `verify_audit` (and by
`status`): a budget edited, or an allocation deleted, straight in the database shows there. Under
`GREENSTACK_AUDIT_KEY` the chain and its head (kept on the pool row) are HMAC'd too.

Rules for a request of X kg by participant P (fair share = P's budget):
  * P's charged total + X within its fair share, and the pool has room -> approved, charged X;
  * otherwise, if the pool has room for X x premium -> approved at a premium, charged X x premium
    (1.5 by default, set per pool);
  * otherwise denied, with alternatives (a smaller request, a lower-intensity hour, a cleaner zone).
Amounts are stored as integer milligrams so sums are exact: "never more than the pool" holds to the mg.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from greenstack.errors import ConfigError, Problem
from greenstack.ledger.audit import (
    GENESIS,
    AuditProblem,
    VerifyResult,
    audit_key,
    canonical,
    head_mac,
    make_head,
    make_record,
    verify_lines,
)

SCHEMA = "greenstack.pool/1"
DEFAULT_PREMIUM = 1.5
DEFAULT_ZONE = "DE-LU"  # the `carbon=embedded` default, used when a request names no zone
MG_PER_KG = 1_000_000
#: the largest amount the pool accepts: integer milligrams overflow a 64-bit column past ~9.2e12 kg
MAX_KG = 1e12
Status = Literal["approved", "approved_premium", "denied"]

_DDL = (
    """CREATE TABLE IF NOT EXISTS greenstack_pool (
        id INTEGER PRIMARY KEY CHECK (id = 1), schema TEXT NOT NULL, premium_factor DOUBLE PRECISION NOT NULL,
        created_at TEXT NOT NULL, audit_seq BIGINT NOT NULL DEFAULT 0, audit_hash TEXT NOT NULL DEFAULT '',
        audit_mac TEXT NOT NULL DEFAULT '')""",
    """CREATE TABLE IF NOT EXISTS greenstack_participants (
        name TEXT PRIMARY KEY, budget_mg BIGINT NOT NULL CHECK (budget_mg >= 0),
        used_mg BIGINT NOT NULL DEFAULT 0)""",
    """CREATE TABLE IF NOT EXISTS greenstack_allocations (
        id BIGINT PRIMARY KEY, participant TEXT NOT NULL, run_id TEXT, status TEXT NOT NULL,
        requested_mg BIGINT NOT NULL, charged_mg BIGINT NOT NULL, factor DOUBLE PRECISION NOT NULL,
        settled_mg BIGINT, created_at TEXT NOT NULL, settled_at TEXT, reason TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS greenstack_audit (seq BIGINT PRIMARY KEY, line TEXT NOT NULL)""",
)
#: allocation states that hold carbon: reserved (approved, not yet measured) and settled (measured)
_HOLDING = ("reserved", "settled")
#: columns added since the first pools were created: (table, column, definition); added on first use
_ADDED_COLUMNS = (("greenstack_pool", "audit_mac", "TEXT NOT NULL DEFAULT ''"),
                  ("greenstack_participants", "used_mg", "BIGINT NOT NULL DEFAULT 0"))


def to_mg(kg: float, key: str = "--kg") -> int:
    """kg as integer milligrams; an amount that is not finite or does not fit the ledger is a ConfigError."""
    kg = float(kg)
    if not math.isfinite(kg) or abs(kg) > MAX_KG:
        raise ConfigError(Problem(key, kg, f"must be a finite amount of at most {MAX_KG:g} kgCO2e"))
    return int(round(kg * MG_PER_KG))


def to_kg(mg: int | float | None) -> float:
    return int(mg or 0) / MG_PER_KG


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


# -- backends ---------------------------------------------------------------------------------------
class _Backend:
    kind = "?"
    retryable: tuple[type[BaseException], ...] = ()

    def connect(self) -> Any:
        raise NotImplementedError

    def write(self, conn: Any) -> contextlib.AbstractContextManager[Any]:
        """A transaction holding the pool-wide write lock."""
        raise NotImplementedError

    def ddl(self, conn: Any, statement: str) -> None:
        """Run one CREATE ... IF NOT EXISTS in its own transaction."""
        raise NotImplementedError

    def sql(self, text: str) -> str:
        return text


class _Sqlite(_Backend):
    kind = "sqlite"
    retryable = (sqlite3.OperationalError,)

    def __init__(self, path: str) -> None:
        self.path = path
        self.url = path

    def connect(self) -> Any:
        parent = Path(self.path).expanduser().resolve().parent
        if not parent.is_dir():
            raise ConfigError(Problem("--db", self.path, "the folder for the pool's SQLite file does not exist",
                                      "create it, or give a PostgreSQL URL (postgresql://...)"))
        conn = sqlite3.connect(str(Path(self.path).expanduser()), timeout=60.0, isolation_level=None)
        conn.execute("PRAGMA busy_timeout = 60000")
        return conn

    @contextlib.contextmanager
    def write(self, conn: Any) -> Iterator[Any]:
        conn.execute("BEGIN IMMEDIATE")  # takes the write lock now: no two allocations interleave
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def ddl(self, conn: Any, statement: str) -> None:
        conn.execute(statement)

    def columns(self, conn: Any, table: str) -> set[str]:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})").fetchall()}


class _Postgres(_Backend):
    kind = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        try:
            import psycopg
        except ImportError as e:
            raise ConfigError(Problem("--db", redact(url), "PostgreSQL needs the psycopg driver",
                                      'pip install "psycopg[binary]>=3.1" (or greenstack[postgres])')) from e
        self._psycopg = psycopg
        self.retryable = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected,
                          psycopg.errors.LockNotAvailable)

    def connect(self) -> Any:
        try:
            return self._psycopg.connect(self.url, connect_timeout=15)
        except self._psycopg.OperationalError as e:
            raise ConfigError(Problem("--db", redact(self.url), f"cannot connect to PostgreSQL: "
                                      f"{str(e).strip().splitlines()[0] if str(e).strip() else e}",
                                      "check host, port, user and database in the URL")) from None

    @contextlib.contextmanager
    def write(self, conn: Any) -> Iterator[Any]:
        with conn.transaction():
            cur = conn.cursor()
            # the pool row is the pool-wide lock; later reads in this READ COMMITTED transaction see
            # every allocation committed before the lock was granted
            try:
                cur.execute("SELECT id FROM greenstack_pool WHERE id = 1 FOR UPDATE")
            except self._psycopg.errors.UndefinedTable:
                raise ConfigError(Problem("--db", redact(self.url), "no carbon pool in this database",
                                          "create one: greenstack pool create --db DB --participant TEAM=KG ...")
                                  ) from None
            yield conn

    def ddl(self, conn: Any, statement: str) -> None:
        try:
            with conn.transaction():
                conn.execute(statement)
        except (self._psycopg.errors.DuplicateTable, self._psycopg.errors.UniqueViolation):
            pass  # another creator won the race on the catalog: the table exists

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def columns(self, conn: Any, table: str) -> set[str]:
        cur = conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = %s", (table,))
        return {row[0] for row in cur.fetchall()}


def _backend(db: str) -> _Backend:
    db = str(db).strip()
    if not db:
        raise ConfigError(Problem("--db", db, "no pool database given",
                                  "a SQLite file path, or postgresql://user@host:port/dbname"))
    scheme = db.split("://", 1)[0].lower() if "://" in db else ""
    if scheme in ("postgresql", "postgres"):
        return _Postgres(db)
    if scheme == "sqlite":  # SQLAlchemy's form: sqlite:///relative.db, sqlite:////absolute/path.db
        if not db.startswith("sqlite:///"):
            raise ConfigError(Problem("--db", db, "a SQLite URL has three slashes", "sqlite:///pool.db or a path"))
        return _Sqlite(db[len("sqlite:///"):])
    if scheme:
        raise ConfigError(Problem("--db", redact(db), f"unsupported database scheme {scheme!r}",
                                  "a SQLite file path or a postgresql:// URL"))
    return _Sqlite(db)


# -- results ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeniedRequest:
    """What an alternatives provider gets: the request and the balances that made it fail."""

    participant: str
    requested_kg: float
    share_remaining_kg: float
    pool_remaining_kg: float
    premium_factor: float
    zone: str | None = None
    duration_h: float | None = None
    at: datetime | None = None

    def would_be(self, kg: float) -> Status:
        """How the pool would answer a request of `kg` given the same balances."""
        if kg <= self.share_remaining_kg + 1e-9 and kg <= self.pool_remaining_kg + 1e-9:
            return "approved"
        if kg * self.premium_factor <= self.pool_remaining_kg + 1e-9:
            return "approved_premium"
        return "denied"


AlternativesFn = Callable[[DeniedRequest], Sequence[Mapping[str, Any]]]


def alternative_text(alt: Mapping[str, Any]) -> str:
    """One line for an alternative the pool offers with a denial (reduce, shift in time, shift region)."""
    kind = alt.get("kind")
    if kind == "reduce":
        return f"request at most {alt.get('max_kg')} kg ({alt.get('would_be')})"
    if kind == "shift_time":
        return f"start at {alt.get('start')} in {alt.get('zone')} (~{alt.get('projected_kg')} kg, {alt.get('would_be')})"
    if kind == "shift_region":
        return f"run in {alt.get('zone')} (~{alt.get('projected_kg')} kg, {alt.get('would_be')})"
    return str(alt.get("note") or alt)


@dataclass
class Decision:
    """The pool's answer to one request (also the JSON printed by `greenstack pool request --json`)."""

    status: Status
    participant: str
    requested_kg: float
    charged_kg: float
    premium_factor: float
    reason: str
    allocation_id: int | None
    run_id: str | None
    fair_share_kg: float
    participant_used_kg: float  # charged total before this request
    pool_total_kg: float
    pool_used_kg: float  # charged total before this request
    audit_seq: int
    audit_hash: str
    alternatives: list[dict[str, Any]] = field(default_factory=list)

    @property
    def approved(self) -> bool:
        return self.status != "denied"

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["approved"] = self.approved
        out["premium"] = self.status == "approved_premium"
        return out


# -- the pool ---------------------------------------------------------------------------------------
class CarbonPool:
    """A carbon pool in a SQLite file (default) or a PostgreSQL database (URL)."""

    def __init__(self, db: str | Path, *, retries: int = 50) -> None:
        self.db = str(db)
        self._backend = _backend(self.db)
        self.retries = retries
        self._schema_checked = False

    # connection and transaction helpers
    @contextlib.contextmanager
    def _conn(self) -> Iterator[Any]:
        conn = self._backend.connect()
        try:
            yield conn
        finally:
            conn.close()

    def _q(self, conn: Any, text: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        cur = conn.cursor()
        cur.execute(self._backend.sql(text), tuple(params))
        return list(cur.fetchall()) if cur.description else []

    def _write(self, body: Callable[[Any], Any]) -> Any:
        """Run `body(conn)` in a locked write transaction, retrying lock timeouts and serialization failures."""
        self._ensure_schema()
        delay = 0.01
        for attempt in range(self.retries + 1):
            with self._conn() as conn:
                try:
                    with self._backend.write(conn):
                        return body(conn)
                except self._backend.retryable as e:
                    if isinstance(e, sqlite3.OperationalError) and "locked" not in str(e) and "busy" not in str(e):
                        raise
                    if attempt == self.retries:
                        raise ConfigError(Problem("--db", redact(self.db), f"pool database stayed busy: {e}",
                                                  "retry later")) from None
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 1.0)
        raise AssertionError("unreachable")

    def _ensure_schema(self) -> None:
        """Add the columns newer greenstack keeps (running balances, head MAC) to a pool created before them,
        filling the balances from the allocations; checked once per CarbonPool object."""
        if self._schema_checked:
            return
        self._schema_checked = True  # first: `_write` below calls back here
        with self._conn() as conn:
            if not self._backend.columns(conn, "greenstack_pool"):
                return  # no pool here (yet): `create` makes current tables, the others say "no pool"
            missing = [(t, c, d) for t, c, d in _ADDED_COLUMNS if c not in self._backend.columns(conn, t)]
        if not missing:
            return

        def body(conn: Any) -> None:
            for table, column, definition in missing:
                if column in self._backend.columns(conn, table):
                    continue  # another process migrated first
                self._q(conn, f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                if column == "used_mg":
                    holding = ", ".join(f"'{s}'" for s in _HOLDING)
                    self._q(conn, "UPDATE greenstack_participants SET used_mg = (SELECT COALESCE(SUM(charged_mg), 0) "
                                  "FROM greenstack_allocations a WHERE a.participant = greenstack_participants.name "
                                  f"AND a.status IN ({holding}))")

        self._write(body)

    def _audit(self, conn: Any, kind: str, data: Mapping[str, Any]) -> tuple[int, str]:
        """Append one record to the pool's chain (keyed under GREENSTACK_AUDIT_KEY) and move the head."""
        seq, prev = self._q(conn, "SELECT audit_seq, audit_hash FROM greenstack_pool WHERE id = 1")[0]
        key = audit_key()
        record = make_record(int(seq) + 1, str(prev) if int(seq) else GENESIS, kind, data, actor="greenstack.pool",
                             key=key)
        self._q(conn, "INSERT INTO greenstack_audit (seq, line) VALUES (?, ?)", (record["seq"], canonical(record)))
        self._q(conn, "UPDATE greenstack_pool SET audit_seq = ?, audit_hash = ?, audit_mac = ? WHERE id = 1",
                (record["seq"], record["hash"], head_mac(key, record["seq"], record["hash"]) if key else ""))
        return int(record["seq"]), str(record["hash"])

    def _require_pool(self, conn: Any) -> float:
        try:
            rows = self._q(conn, "SELECT premium_factor FROM greenstack_pool WHERE id = 1")
        except Exception as e:  # table missing: sqlite3.OperationalError / psycopg UndefinedTable
            if "greenstack_pool" not in str(e) and "no such table" not in str(e):
                raise
            rows = []
        if not rows:
            raise ConfigError(Problem("--db", redact(self.db), "no carbon pool in this database",
                                      "create one: greenstack pool create --db DB --participant TEAM=KG ..."))
        return float(rows[0][0])

    # -- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def create(cls, db: str | Path, participants: Mapping[str, float], *,
               premium_factor: float = DEFAULT_PREMIUM) -> CarbonPool:
        """Create the pool's tables and participants; refuses if the database already holds a pool."""
        problems = _check_participants(participants)
        if not (math.isfinite(premium_factor) and premium_factor >= 1.0):
            problems.append(Problem("--premium", premium_factor, "the premium multiplies the charge: must be >= 1"))
        if problems:
            raise ConfigError(problems)
        pool = cls(db)
        with pool._conn() as conn:
            if pool._backend.kind == "sqlite":
                conn.execute("PRAGMA journal_mode = WAL")  # readers (status) never block allocations
            for ddl in _DDL:
                pool._backend.ddl(conn, ddl)

        def body(conn: Any) -> None:
            if pool._q(conn, "SELECT id FROM greenstack_pool WHERE id = 1"):
                raise ConfigError(Problem("--db", redact(pool.db), "this database already holds a carbon pool",
                                          "change budgets with `greenstack pool budget`, or use another --db"))
            pool._q(conn, "INSERT INTO greenstack_pool (id, schema, premium_factor, created_at) VALUES (1, ?, ?, ?)",
                    (SCHEMA, float(premium_factor), _now().isoformat()))
            for name, kg in participants.items():
                pool._q(conn, "INSERT INTO greenstack_participants (name, budget_mg) VALUES (?, ?)", (name, to_mg(kg)))
            pool._audit(conn, "pool", {"action": "create", "premium_factor": float(premium_factor),
                                       "participants": {n: float(k) for n, k in participants.items()}})

        if pool._backend.kind == "sqlite":
            pool._write(body)
        else:  # the pool row (the lock) does not exist yet: serialise creators on the table instead
            with pool._conn() as conn, conn.transaction():
                pool._q(conn, "LOCK TABLE greenstack_pool IN EXCLUSIVE MODE")
                body(conn)
        return pool

    def set_budget(self, participant: str, kg: float) -> None:
        """Add a participant or change its budget (audited)."""
        problems = _check_participants({participant: kg})
        if problems:
            raise ConfigError(problems)

        def body(conn: Any) -> None:
            self._require_pool(conn)
            old = self._q(conn, "SELECT budget_mg FROM greenstack_participants WHERE name = ?", (participant,))
            if old:
                self._q(conn, "UPDATE greenstack_participants SET budget_mg = ? WHERE name = ?", (to_mg(kg), participant))
            else:
                self._q(conn, "INSERT INTO greenstack_participants (name, budget_mg) VALUES (?, ?)",
                        (participant, to_mg(kg)))
            self._audit(conn, "pool", {"action": "budget", "participant": participant, "budget_kg": float(kg),
                                       "previous_kg": to_kg(old[0][0]) if old else None})

        self._write(body)

    # -- allocation -----------------------------------------------------------------------------
    def request(self, participant: str, kg: float, *, run_id: str | None = None, zone: str | None = None,
                duration_h: float | None = None,
                alternatives: AlternativesFn | None | Literal["default"] = "default") -> Decision:
        """Ask for `kg` for `participant`: approved, approved at a premium, or denied with alternatives.

        An approved request holds its charge ("reserved") until `settle` replaces it with the measured
        amount. `alternatives` is called only for a denial, outside the transaction (it may be slow);
        "default" uses `default_alternatives` (shipped traces), None skips them.
        """
        if not (isinstance(kg, (int, float)) and math.isfinite(kg) and kg > 0):
            raise ConfigError(Problem("--kg", kg, "a request must be a positive amount of kgCO2e"))
        want = to_mg(kg)
        if want == 0:
            raise ConfigError(Problem("--kg", kg, "below the pool's resolution of 1 mg"))
        now = _now()

        def body(conn: Any) -> tuple[Decision, DeniedRequest | None]:
            factor = self._require_pool(conn)
            share_rows = self._q(conn, "SELECT budget_mg, used_mg FROM greenstack_participants WHERE name = ?",
                                 (participant,))
            if not share_rows:
                names = [r[0] for r in self._q(conn, "SELECT name FROM greenstack_participants ORDER BY name")]
                raise ConfigError(Problem("--participant", participant, "not a participant of this pool",
                                          f"participants: {', '.join(names) or 'none'}"))
            share, used_p = int(share_rows[0][0]), int(share_rows[0][1])
            # running balances: a few rows whatever the history (participants are few, allocations many)
            total, used_all = (int(v) for v in self._q(conn, "SELECT COALESCE(SUM(budget_mg), 0), "
                                                             "COALESCE(SUM(used_mg), 0) FROM greenstack_participants")[0])
            room = total - used_all
            premium_mg = int(math.ceil(want * factor))
            if used_p + want <= share and want <= room:
                status, charged = "approved", want
                reason = (f"within fair share: {to_kg(used_p):g} + {to_kg(want):g} <= {to_kg(share):g} kg")
            elif premium_mg <= room:
                status, charged = "approved_premium", premium_mg
                reason = (f"over fair share ({to_kg(used_p):g} + {to_kg(want):g} > {to_kg(share):g} kg); the pool "
                          f"has room: charged {factor:g}x = {to_kg(premium_mg):g} kg of {to_kg(room):g} kg free")
            else:
                status, charged = "denied", 0
                why = (f"over fair share ({to_kg(used_p):g} + {to_kg(want):g} > {to_kg(share):g} kg) and "
                       if used_p + want > share else "within fair share but ")
                need = premium_mg if used_p + want > share else want
                reason = why + f"the pool has {to_kg(max(room, 0)):g} kg free, {to_kg(need):g} kg needed"
            alloc_id = int(self._q(conn, "SELECT COALESCE(MAX(id), 0) + 1 FROM greenstack_allocations")[0][0])
            self._q(conn, "INSERT INTO greenstack_allocations (id, participant, run_id, status, requested_mg, "
                          "charged_mg, factor, settled_mg, created_at, settled_at, reason) "
                          "VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, NULL, ?)",
                    (alloc_id, participant, run_id, "reserved" if status != "denied" else "denied", want, charged,
                     factor if status == "approved_premium" else 1.0, now.isoformat(), reason))
            if charged:
                self._q(conn, "UPDATE greenstack_participants SET used_mg = used_mg + ? WHERE name = ?",
                        (charged, participant))
            seq, digest_ = self._audit(conn, "allocation", {
                "allocation_id": alloc_id, "participant": participant, "run_id": run_id, "decision": status,
                "requested_kg": to_kg(want), "charged_kg": to_kg(charged), "premium_factor": factor,
                "fair_share_kg": to_kg(share), "participant_used_kg": to_kg(used_p),
                "pool_total_kg": to_kg(total), "pool_used_kg": to_kg(used_all), "reason": reason})
            decision = Decision(status, participant, to_kg(want), to_kg(charged), factor, reason,
                                alloc_id if status != "denied" else None, run_id, to_kg(share), to_kg(used_p),
                                to_kg(total), to_kg(used_all), seq, digest_)
            denied = None if status != "denied" else DeniedRequest(
                participant, to_kg(want), to_kg(max(share - used_p, 0)), to_kg(max(room, 0)), factor,
                zone, duration_h, now)
            return decision, denied

        decision, denied = self._write(body)
        if denied is not None and alternatives is not None:
            provider = default_alternatives if alternatives == "default" else alternatives
            decision.alternatives = [dict(a) for a in provider(denied)]  # type: ignore[operator]
        return decision

    reserve = request  # a run reserves its projected emissions with the same rules

    def settle(self, allocation_id: int, measured_kg: float) -> dict[str, Any]:
        """Replace a reservation by the measured emissions (x the reservation's premium factor).

        The measured amount is a fact, so it is recorded even if it exceeds the reservation; the pool
        may then show `overdrawn_kg` in `status`.
        """
        if not (isinstance(measured_kg, (int, float)) and math.isfinite(measured_kg) and measured_kg >= 0):
            raise ConfigError(Problem("--kg", measured_kg, "measured emissions must be a number >= 0"))

        def body(conn: Any) -> dict[str, Any]:
            self._require_pool(conn)
            rows = self._q(conn, "SELECT participant, status, charged_mg, factor, run_id FROM greenstack_allocations "
                                 "WHERE id = ?", (int(allocation_id),))
            if not rows:
                raise ConfigError(Problem("--id", allocation_id, "no such allocation in this pool"))
            participant, status, reserved_mg, factor, run_id = rows[0]
            if status != "reserved":
                raise ConfigError(Problem("--id", allocation_id, f"allocation is {status}, not reserved",
                                          "only an approved, unsettled allocation can be settled"))
            measured = to_mg(measured_kg)
            charged = int(math.ceil(measured * float(factor)))
            self._q(conn, "UPDATE greenstack_allocations SET status = 'settled', settled_mg = ?, charged_mg = ?, "
                          "settled_at = ? WHERE id = ?", (measured, charged, _now().isoformat(), int(allocation_id)))
            self._q(conn, "UPDATE greenstack_participants SET used_mg = used_mg + ? WHERE name = ?",
                    (charged - int(reserved_mg), participant))
            out = {"allocation_id": int(allocation_id), "participant": participant, "run_id": run_id,
                   "reserved_kg": to_kg(reserved_mg), "measured_kg": to_kg(measured), "premium_factor": float(factor),
                   "charged_kg": to_kg(charged), "released_kg": to_kg(reserved_mg - charged)}
            seq, digest_ = self._audit(conn, "settlement", out)
            return {**out, "audit_seq": seq, "audit_hash": digest_}

        return self._write(body)

    # -- reading --------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Budgets, reserved and settled charges per participant and for the pool (one consistent read)."""
        def body(conn: Any) -> dict[str, Any]:
            factor = self._require_pool(conn)
            budgets = self._q(conn, "SELECT name, budget_mg FROM greenstack_participants ORDER BY name")
            rows = self._q(conn, "SELECT participant, status, COUNT(*), COALESCE(SUM(charged_mg), 0), "
                                 "COALESCE(SUM(settled_mg), 0) FROM greenstack_allocations GROUP BY participant, status")
            head = self._q(conn, "SELECT audit_seq, audit_hash FROM greenstack_pool WHERE id = 1")[0]
            checked = self._verify(conn)
            per: dict[str, dict[str, Any]] = {}
            for name, budget in budgets:
                per[name] = {"name": name, "budget_kg": to_kg(budget), "reserved_kg": 0.0, "settled_kg": 0.0,
                             "measured_kg": 0.0, "approved": 0, "denied": 0}
            for name, status, count, charged, settled in rows:
                p = per.setdefault(name, {"name": name, "budget_kg": 0.0, "reserved_kg": 0.0, "settled_kg": 0.0,
                                          "measured_kg": 0.0, "approved": 0, "denied": 0})
                if status == "denied":
                    p["denied"] += int(count)
                    continue
                p["approved"] += int(count)
                p[f"{status}_kg"] = to_kg(charged)
                if status == "settled":
                    p["measured_kg"] = to_kg(settled)
            for p in per.values():
                p["used_kg"] = p["reserved_kg"] + p["settled_kg"]
                p["remaining_kg"] = p["budget_kg"] - p["used_kg"]
            total = sum(p["budget_kg"] for p in per.values())
            used = sum(p["used_kg"] for p in per.values())
            return {"schema": SCHEMA, "db": redact(self.db), "backend": self._backend.kind, "premium_factor": factor,
                    "total_kg": total, "used_kg": used,
                    "reserved_kg": sum(p["reserved_kg"] for p in per.values()),
                    "settled_kg": sum(p["settled_kg"] for p in per.values()),
                    "remaining_kg": max(total - used, 0.0), "overdrawn_kg": max(used - total, 0.0),
                    "participants": list(per.values()),
                    "audit": {"records": int(head[0]), "head_hash": head[1]},
                    "integrity": {"ok": checked.ok, "keyed": checked.keyed,
                                  "problems": [p.format() for p in checked.problems]}}

        return self._read(body)

    def allocations(self) -> list[dict[str, Any]]:
        """Every allocation (approved, denied, settled), oldest first."""
        with self._conn() as conn:
            self._require_pool(conn)
            rows = self._q(conn, "SELECT id, participant, run_id, status, requested_mg, charged_mg, factor, "
                                 "settled_mg, created_at, settled_at, reason FROM greenstack_allocations ORDER BY id")
        keys = ("id", "participant", "run_id", "status", "requested_kg", "charged_kg", "factor", "settled_kg",
                "created_at", "settled_at", "reason")
        out = []
        for row in rows:
            item = dict(zip(keys, row, strict=True))
            for k in ("requested_kg", "charged_kg"):
                item[k] = to_kg(item[k])
            item["settled_kg"] = None if item["settled_kg"] is None else to_kg(item["settled_kg"])
            out.append(item)
        return out

    def _audit_lines(self, conn: Any) -> tuple[list[str], dict[str, Any]]:
        lines = [r[0] for r in self._q(conn, "SELECT line FROM greenstack_audit ORDER BY seq")]
        seq, hash_, mac = self._q(conn, "SELECT audit_seq, audit_hash, audit_mac FROM greenstack_pool WHERE id = 1")[0]
        return lines, {"seq": int(seq), "hash": str(hash_), **({"mac": str(mac)} if mac else {})}

    def audit_lines(self) -> tuple[list[str], dict[str, Any]]:
        """The pool's audit log as JSONL lines, and its head (sequence, hash and MAC kept on the pool row)."""
        self._ensure_schema()
        with self._conn() as conn:
            self._require_pool(conn)
            return self._audit_lines(conn)

    def _verify(self, conn: Any) -> VerifyResult:
        lines, head = self._audit_lines(conn)
        result = verify_lines(lines, head=head, key=audit_key(), source=f"{redact(self.db)} (greenstack_audit)")
        result.problems.extend(_ledger_problems(self, conn, lines))
        result.problems.sort(key=lambda p: p.line)
        return result

    def verify_audit(self) -> VerifyResult:
        """Check the pool's audit chain against its head, and the ledger's tables against the audited history
        (budgets, allocations, running balances): an edit straight in the database shows here."""
        def body(conn: Any) -> VerifyResult:
            self._require_pool(conn)
            return self._verify(conn)

        return self._read(body)

    def _read(self, body: Callable[[Any], Any]) -> Any:
        """`body(conn)` in one consistent read-only snapshot (REPEATABLE READ on PostgreSQL)."""
        self._ensure_schema()
        with self._conn() as conn:
            if self._backend.kind == "postgresql":
                with conn.transaction():
                    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                    return body(conn)
            conn.execute("BEGIN")
            try:
                return body(conn)
            finally:
                conn.execute("COMMIT")

    def export_audit(self, path: str | Path) -> Path:
        """Write the pool's audit log as a JSONL file plus head file (`greenstack audit verify` reads both)."""
        from greenstack.io import atomic_write_bytes
        from greenstack.ledger.audit import head_path

        lines, head = self.audit_lines()
        head = make_head(head["seq"], head["hash"]) | ({"mac": head["mac"]} if "mac" in head else {})
        path = Path(path)
        atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())
        atomic_write_bytes(head_path(path), (canonical(head) + "\n").encode())
        return path


def _ledger_problems(pool: CarbonPool, conn: Any, lines: Sequence[str]) -> list[AuditProblem]:
    """Where the tables disagree with the history the audit log tells (replayed from its records).

    Budgets come from `create`/`budget` records, allocations from `allocation` records (then
    `settlement`), running balances from both; a row the log never mentions is reported too.
    """
    budgets: dict[str, tuple[int, int]] = {}  # name -> (budget_mg, line)
    allocs: dict[int, dict[str, Any]] = {}  # id -> expected row and the line that last set it
    for n, raw in enumerate(lines, start=1):
        try:
            record = json.loads(raw)
            kind, data = record["kind"], record["data"]
            if kind == "pool" and data.get("action") == "create":
                for name, kg in data["participants"].items():
                    budgets[name] = (to_mg(kg), n)
            elif kind == "pool" and data.get("action") == "budget":
                budgets[data["participant"]] = (to_mg(data["budget_kg"]), n)
            elif kind == "allocation":
                approved = data["decision"] != "denied"
                allocs[int(data["allocation_id"])] = {
                    "participant": data["participant"], "status": "reserved" if approved else "denied",
                    "requested_mg": to_mg(data["requested_kg"]), "charged_mg": to_mg(data["charged_kg"]),
                    "settled_mg": None, "line": n}
            elif kind == "settlement":
                allocs[int(data["allocation_id"])].update(status="settled", settled_mg=to_mg(data["measured_kg"]),
                                                          charged_mg=to_mg(data["charged_kg"]), line=n)
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # an unreadable or edited record is the chain check's to report
    problems: list[AuditProblem] = []
    end = max(len(lines), 1)
    table = {name: (int(b), int(u)) for name, b, u in
             pool._q(conn, "SELECT name, budget_mg, used_mg FROM greenstack_participants")}
    for name in sorted(set(budgets) | set(table)):
        if name not in table:
            problems.append(AuditProblem(budgets[name][1], f"participant {name!r} is missing from "
                                                           "greenstack_participants: deleted in the database"))
        elif name not in budgets:
            problems.append(AuditProblem(end, f"participant {name!r} in greenstack_participants (budget "
                                              f"{to_kg(table[name][0]):g} kg) has no audited record: added in the "
                                              "database"))
        elif table[name][0] != budgets[name][0]:
            problems.append(AuditProblem(budgets[name][1], f"greenstack_participants.budget_mg of {name!r} says "
                                                           f"{to_kg(table[name][0]):g} kg, the audited history "
                                                           f"{to_kg(budgets[name][0]):g} kg: edited in the database"))
    rows = {int(r[0]): r[1:] for r in pool._q(conn, "SELECT id, participant, status, requested_mg, charged_mg, "
                                                    "settled_mg FROM greenstack_allocations")}
    fields = ("participant", "status", "requested_mg", "charged_mg", "settled_mg")
    for alloc_id in sorted(set(allocs) | set(rows)):
        want = allocs.get(alloc_id)
        if alloc_id not in rows:
            problems.append(AuditProblem(want["line"] if want else end, f"allocation {alloc_id} is missing from "
                                                                        "greenstack_allocations: deleted in the database"))
            continue
        if want is None:
            problems.append(AuditProblem(end, f"allocation {alloc_id} in greenstack_allocations has no audited "
                                              "record: inserted in the database"))
            continue
        got = dict(zip(fields, rows[alloc_id], strict=True))
        differ = [f"{f} {got[f]!r} (audited {want[f]!r})" for f in fields
                  if (int(got[f]) if isinstance(got[f], (int, float)) else got[f]) != want[f]]
        if differ:
            problems.append(AuditProblem(want["line"], f"allocation {alloc_id} in greenstack_allocations differs "
                                                       f"from the audited history: {', '.join(differ)}"))
    used: dict[str, int] = {}
    for a in allocs.values():
        if a["status"] in _HOLDING:
            used[a["participant"]] = used.get(a["participant"], 0) + a["charged_mg"]
    for name, (_, used_mg) in sorted(table.items()):
        if name in budgets and used_mg != used.get(name, 0):
            problems.append(AuditProblem(end, f"greenstack_participants.used_mg of {name!r} says {to_kg(used_mg):g} "
                                              f"kg charged, the audited allocations {to_kg(used.get(name, 0)):g} kg: "
                                              "edited in the database"))
    return problems


def _check_participants(participants: Mapping[str, float]) -> list[Problem]:
    problems = []
    if not participants:
        problems.append(Problem("--participant", None, "a pool needs at least one participant", "NAME=KG"))
    for name, kg in participants.items():
        if not name or not str(name).strip():
            problems.append(Problem("--participant", name, "participant name is empty"))
        if not (isinstance(kg, (int, float)) and math.isfinite(kg) and kg >= 0):
            problems.append(Problem("--participant", f"{name}={kg}", "budget must be a number of kgCO2e >= 0"))
    return problems


def parse_participants(items: Sequence[str]) -> dict[str, float]:
    """`["ml-team=120", "nlp=80.5"]` -> {"ml-team": 120.0, "nlp": 80.5}; every bad item reported at once."""
    out: dict[str, float] = {}
    problems = []
    for item in items:
        name, sep, value = str(item).rpartition("=")
        try:
            kg = float(value)
        except ValueError:
            kg = math.nan
        if not sep or not name.strip() or not math.isfinite(kg) or kg < 0:
            problems.append(Problem("--participant", item, "expected NAME=KG with KG >= 0", "e.g. vision=120"))
        elif kg > MAX_KG:
            problems.append(Problem("--participant", item, f"KG must be at most {MAX_KG:g}"))
        elif name.strip() in out:
            problems.append(Problem("--participant", item, "participant given twice"))
        else:
            out[name.strip()] = kg
    if problems:
        raise ConfigError(problems)
    return out


def _now() -> datetime:
    return datetime.now(timezone.utc)


# -- alternatives for a denied request ----------------------------------------------------------
def default_alternatives(req: DeniedRequest, *, horizon_h: int = 72) -> list[dict[str, Any]]:
    """Simple alternatives from the shipped hourly traces (replayed hour-of-week), no scheduler needed.

    * reduce: the largest request the pool would approve now;
    * shift_time: the next window of the run's length in its zone whose replayed intensity makes the
      same energy cost less carbon, preferring the earliest one that the pool would approve;
    * shift_region: the shipped zone with the lowest replayed intensity over the same hours.
    Projected kg scale the request by the intensity ratio (same energy), labelled "estimated".
    """
    out: list[dict[str, Any]] = []
    best_now = max(min(req.share_remaining_kg, req.pool_remaining_kg), req.pool_remaining_kg / req.premium_factor)
    if best_now * MG_PER_KG >= 1:
        fair = min(req.share_remaining_kg, req.pool_remaining_kg)
        kg = fair if fair * MG_PER_KG >= 1 else best_now
        out.append({"kind": "reduce", "max_kg": round(kg, 6), "would_be": req.would_be(kg),
                    "note": "the largest request the pool approves now" +
                            (" within fair share" if kg == fair else " at the premium")})
    try:
        out.extend(_trace_alternatives(req, horizon_h))
    except ConfigError as e:  # unknown zone: say so rather than fail the denial
        out.append({"kind": "note", "note": f"no time/region alternatives: {e}"})
    return out


def _trace_alternatives(req: DeniedRequest, horizon_h: int) -> list[dict[str, Any]]:
    import numpy as np

    from greenstack.carbon.sources import EmbeddedTraceSource
    from greenstack.carbon.traces import available_zones, find_zone

    zone = find_zone(req.zone or DEFAULT_ZONE)
    if zone is None:
        raise ConfigError(Problem("zone", req.zone, "no shipped trace for this zone"))
    at = (req.at or _now()).replace(minute=0, second=0, microsecond=0)
    width = max(1, int(math.ceil(req.duration_h or 1.0)))
    hours = np.array([(at + timedelta(hours=h)).timestamp() for h in range(horizon_h + width)])
    here = EmbeddedTraceSource(zone).series_at(hours)
    ci = here.intensity_g_per_kwh
    window_means = np.convolve(ci, np.ones(width) / width, mode="valid")[: horizon_h + 1]
    now_mean = float(window_means[0])
    out: list[dict[str, Any]] = []
    candidates = [i for i in range(1, len(window_means)) if window_means[i] < now_mean]
    pick = next((i for i in candidates if req.would_be(req.requested_kg * window_means[i] / now_mean) == "approved"),
                None)
    if pick is None and candidates:
        pick = min(candidates, key=lambda i: window_means[i])
    if pick is not None:
        start = at + timedelta(hours=pick)
        kg = req.requested_kg * float(window_means[pick]) / now_mean
        out.append({"kind": "shift_time", "zone": zone, "start": start.isoformat(),
                    "end": (start + timedelta(hours=width)).isoformat(),
                    "intensity_g_per_kwh": round(float(window_means[pick]), 2),
                    "intensity_now_g_per_kwh": round(now_mean, 2), "projected_kg": round(kg, 6),
                    "would_be": req.would_be(kg), "provenance": "estimated",
                    "source": f"{here.source}; same energy x intensity ratio"})
    best: tuple[float, str, str] | None = None
    for other in available_zones():
        if other == zone:
            continue
        look = EmbeddedTraceSource(other).series_at(hours[:width])
        mean = float(np.mean(look.intensity_g_per_kwh))
        if best is None or mean < best[0]:
            best = (mean, other, look.source)
    if best is not None and best[0] < now_mean:
        kg = req.requested_kg * best[0] / now_mean
        out.append({"kind": "shift_region", "zone": best[1], "start": at.isoformat(),
                    "end": (at + timedelta(hours=width)).isoformat(), "intensity_g_per_kwh": round(best[0], 2),
                    "intensity_now_g_per_kwh": round(now_mean, 2), "from_zone": zone, "projected_kg": round(kg, 6),
                    "would_be": req.would_be(kg), "provenance": "estimated",
                    "source": f"{best[2]}; same energy x intensity ratio"})
    return out


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
