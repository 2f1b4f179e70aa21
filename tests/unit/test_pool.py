"""Carbon pool on SQLite: allocation rules, reserve/settle, the pool's own audit chain, and 32 racing processes."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from greenstack.errors import ConfigError
from greenstack.ledger.audit import AuditLog, verify
from greenstack.ledger.pool import CarbonPool, DeniedRequest, default_alternatives, parse_participants
from greenstack.policies.pool_allocation import PoolAllocation, PoolConfig, PoolDenied
from tests.helpers.hooks import fire

RACE_WORKER = r"""
import json, os, sys, time
from pathlib import Path
from greenstack.ledger.pool import CarbonPool
db, participant, kg, go, ready = sys.argv[1], sys.argv[2], float(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5])
pool = CarbonPool(db)
ready.touch()
while not go.exists():
    time.sleep(0.002)
decision = pool.request(participant, kg, run_id=f"race-{os.getpid()}", alternatives=None)
print(json.dumps(decision.to_dict()))
"""


def race(db: str, requests: list[tuple[str, float]], workdir: Path) -> list[dict]:
    """Fire `requests` from separate processes at the same instant; returns their decisions."""
    go = workdir / "go"
    procs = []
    for i, (participant, kg) in enumerate(requests):
        ready = workdir / f"ready-{i}"
        procs.append((ready, subprocess.Popen([sys.executable, "-c", RACE_WORKER, db, participant, repr(kg), str(go),
                                               str(ready)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True)))
    deadline = time.monotonic() + 240
    while not all(r.exists() for r, _ in procs):
        assert time.monotonic() < deadline, "race workers did not start"
        assert all(p.poll() is None for _, p in procs), [p.communicate()[1] for _, p in procs if p.poll() is not None]
        time.sleep(0.02)
    go.touch()
    out = []
    for _, p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr
        out.append(json.loads(stdout))
    return out


def replay(budgets: dict[str, float], factor: float, decisions: list[dict]) -> None:
    """The concurrent outcome must equal the rules applied one by one in the committed (audit) order."""
    used = dict.fromkeys(budgets, 0)
    total = sum(round(b * 1e6) for b in budgets.values())
    for d in sorted(decisions, key=lambda d: d["audit_seq"]):
        want, p = round(d["requested_kg"] * 1e6), d["participant"]
        room = total - sum(used.values())
        if used[p] + want <= round(budgets[p] * 1e6) and want <= room:
            expect, charged = "approved", want
        elif math.ceil(want * factor) <= room:
            expect, charged = "approved_premium", math.ceil(want * factor)
        else:
            expect, charged = "denied", 0
        assert (d["status"], round(d["charged_kg"] * 1e6)) == (expect, charged), d
        used[p] += charged


def check_race(db: str, tmp_path: Path) -> None:
    budgets = {"vision": 8.0, "nlp": 4.0}
    CarbonPool.create(db, budgets)
    requests = [("vision" if i % 2 else "nlp", 0.7 if i % 3 else 1.0) for i in range(32)]
    decisions = race(db, requests, tmp_path)
    approved = [d for d in decisions if d["approved"]]
    assert approved and len(approved) < 32
    total_charged = sum(d["charged_kg"] for d in approved)
    assert total_charged <= sum(budgets.values()) + 1e-9
    pool = CarbonPool(db)
    status = pool.status()
    assert status["used_kg"] == pytest.approx(total_charged, abs=1e-6)
    assert status["overdrawn_kg"] == 0
    assert sorted(d["audit_seq"] for d in decisions) == list(range(2, 34))  # one commit each, no lost update
    replay(budgets, 1.5, decisions)
    assert pool.verify_audit().ok


def test_32_concurrent_processes_never_exceed_the_pool_sqlite(tmp_path):
    check_race(str(tmp_path / "pool.sqlite"), tmp_path)


# -- rules --------------------------------------------------------------------------------------
@pytest.fixture
def pool(tmp_path) -> CarbonPool:
    return CarbonPool.create(tmp_path / "pool.sqlite", {"vision": 10.0, "nlp": 5.0})


def test_within_fair_share_is_approved_at_face_value(pool):
    d = pool.request("vision", 6.0, alternatives=None)
    assert (d.status, d.charged_kg, d.approved) == ("approved", 6.0, True)
    assert d.allocation_id == 1 and d.fair_share_kg == 10.0 and d.pool_total_kg == 15.0


def test_over_fair_share_with_room_is_charged_the_premium(pool):
    pool.request("vision", 8.0, alternatives=None)
    d = pool.request("vision", 4.0, alternatives=None)  # 12 > 10, pool has 7 free >= 6
    assert (d.status, d.charged_kg) == ("approved_premium", 6.0)
    assert pool.status()["used_kg"] == 14.0


def test_without_room_the_request_is_denied_with_reason(pool):
    pool.request("vision", 8.0, alternatives=None)
    d = pool.request("vision", 5.0, alternatives=None)  # premium 7.5 > 7 free
    assert d.status == "denied" and d.charged_kg == 0 and d.allocation_id is None
    assert "7.5" in d.reason and "7 kg free" in d.reason
    assert pool.status()["used_kg"] == 8.0


def test_premium_borrowing_can_exhaust_another_teams_share(pool):
    pool.request("vision", 10.0, alternatives=None)
    assert pool.request("vision", 3.0, alternatives=None).status == "approved_premium"  # 4.5 of 5 free
    d = pool.request("nlp", 1.0, alternatives=None)  # under nlp's share, but only 0.5 kg left in the pool
    assert d.status == "denied" and "within fair share" in d.reason


def test_premium_factor_is_configurable(tmp_path):
    pool = CarbonPool.create(tmp_path / "p.sqlite", {"a": 1.0, "b": 9.0}, premium_factor=2.0)
    d = pool.request("a", 2.0, alternatives=None)
    assert (d.status, d.charged_kg, d.premium_factor) == ("approved_premium", 4.0, 2.0)


def test_settle_replaces_the_reservation_with_the_measured_amount(pool):
    d = pool.request("vision", 8.0, run_id="r1", alternatives=None)
    out = pool.settle(d.allocation_id, 5.5)
    assert out["charged_kg"] == 5.5 and out["released_kg"] == 2.5
    status = pool.status()
    vision = next(p for p in status["participants"] if p["name"] == "vision")
    assert (vision["reserved_kg"], vision["settled_kg"], vision["remaining_kg"]) == (0.0, 5.5, 4.5)
    with pytest.raises(ConfigError, match="settled, not reserved"):
        pool.settle(d.allocation_id, 1.0)


def test_premium_reservation_settles_at_its_premium_and_overdraw_is_reported(pool):
    pool.request("vision", 10.0, alternatives=None)
    d = pool.request("vision", 2.0, alternatives=None)
    assert d.status == "approved_premium"
    assert pool.settle(d.allocation_id, 4.0)["charged_kg"] == 6.0  # measured 4 kg x 1.5
    status = pool.status()
    assert status["used_kg"] == 16.0 and status["overdrawn_kg"] == 1.0 and status["remaining_kg"] == 0.0
    assert pool.request("nlp", 0.1, alternatives=None).status == "denied"


def test_bad_requests_are_config_errors(pool, tmp_path):
    with pytest.raises(ConfigError, match="not a participant"):
        pool.request("nobody", 1.0)
    for kg in (0, -1, math.nan):
        with pytest.raises(ConfigError):
            pool.request("vision", kg)
    with pytest.raises(ConfigError, match="no such allocation"):
        pool.settle(99, 1.0)
    with pytest.raises(ConfigError, match="already holds a carbon pool"):
        CarbonPool.create(pool.db, {"x": 1.0})
    with pytest.raises(ConfigError, match="no carbon pool"):
        CarbonPool(tmp_path / "empty.sqlite").status()
    with pytest.raises(ConfigError) as e:
        parse_participants(["a=1", "b", "c=-2", "a=3"])
    assert len(e.value.problems) == 3


def test_alternatives_are_computed_only_for_denials(pool):
    calls = []

    def provider(req: DeniedRequest):
        calls.append(req)
        return [{"kind": "custom", "max_kg": req.share_remaining_kg}]

    assert pool.request("nlp", 1.0, alternatives=provider).alternatives == []
    d = pool.request("nlp", 30.0, alternatives=provider, zone="GB", duration_h=2)
    assert d.alternatives == [{"kind": "custom", "max_kg": 4.0}]
    (req,) = calls
    assert (req.requested_kg, req.share_remaining_kg, req.pool_remaining_kg, req.zone) == (30.0, 4.0, 14.0, "GB")
    assert req.would_be(4.0) == "approved" and req.would_be(9.0) == "approved_premium" and req.would_be(10) == "denied"


def test_default_alternatives_from_shipped_traces():
    req = DeniedRequest("nlp", 6.0, share_remaining_kg=2.0, pool_remaining_kg=4.0, premium_factor=1.5, zone="GB",
                        duration_h=2, at=datetime(2023, 6, 1, 17, 0, tzinfo=timezone.utc))
    alts = {a["kind"]: a for a in default_alternatives(req)}
    assert alts["reduce"]["max_kg"] == 2.0 and alts["reduce"]["would_be"] == "approved"
    shift = alts["shift_time"]
    assert shift["zone"] == "GB" and shift["intensity_g_per_kwh"] < shift["intensity_now_g_per_kwh"]
    assert shift["projected_kg"] == pytest.approx(6.0 * shift["intensity_g_per_kwh"] / shift["intensity_now_g_per_kwh"],
                                                  rel=1e-3)
    assert datetime.fromisoformat(shift["start"]) > req.at
    region = alts["shift_region"]
    assert region["zone"] != "GB" and region["intensity_g_per_kwh"] < shift["intensity_now_g_per_kwh"]
    assert all(a["would_be"] == req.would_be(a.get("projected_kg", a.get("max_kg"))) for a in alts.values())


def test_pool_audit_chain_lives_in_the_database_and_detects_tampering(pool, tmp_path):
    pool.request("vision", 3.0, alternatives=None)
    pool.request("nlp", 9.0, alternatives=None)
    assert pool.verify_audit().ok
    lines, head = pool.audit_lines()
    assert [json.loads(x)["kind"] for x in lines] == ["pool", "allocation", "allocation"]
    assert head["seq"] == 3
    with sqlite3.connect(pool.db) as conn:  # an admin quietly rewrites a decision
        conn.execute("UPDATE greenstack_audit SET line = replace(line, '\"decision\":\"denied\"', "
                     "'\"decision\":\"approved\"') WHERE seq = 3")
    result = pool.verify_audit()
    assert not result.ok and result.first_bad_line == 3
    exported = pool.export_audit(tmp_path / "pool-audit.jsonl")
    assert verify(exported).first_bad_line == 3


# -- runs reserve and settle ---------------------------------------------------------------------
def test_run_reserves_before_training_and_settles_measured(pool, tmp_path):
    audit = AuditLog(tmp_path / "run" / "audit.jsonl")
    cfg = PoolConfig.from_node({"db": pool.db, "participant": "vision", "reserve_kg": 4.0})
    alloc = PoolAllocation(cfg, run_id="run-1", audit=audit, zone="DE-LU")
    d = alloc.reserve_before_training()
    assert d is not None and d.status == "approved" and alloc.allocation_id == d.allocation_id
    assert alloc.summary()["pool/decision"].value == "approved"
    alloc.settle(3.25)
    alloc.close()  # already settled: nothing more
    kinds = [(r["kind"], r["data"].get("run_id")) for r in audit.records()]
    assert kinds == [("allocation", "run-1"), ("settlement", "run-1")]
    assert verify(audit.path).ok
    assert pool.allocations()[0]["settled_kg"] == 3.25


def test_denied_run_stops_before_training_or_warns(pool, tmp_path):
    pool.request("vision", 10.0, alternatives=None)
    pool.request("nlp", 5.0, alternatives=None)
    stop = PoolAllocation(PoolConfig(pool.db, "nlp", reserve_kg=1.0), run_id="r", pool=pool)
    with pytest.raises(PoolDenied) as e:
        stop.reserve_before_training()
    assert e.value.exit_code == 3 and "denied" in str(e.value)
    warn = PoolAllocation(PoolConfig(pool.db, "nlp", reserve_kg=1.0, on_denied="warn"), run_id="r", pool=pool)
    assert warn.reserve_before_training().status == "denied"


def test_run_without_projection_reserves_after_first_epoch(pool):
    import torch

    from greenstack.engine.events import Event
    from greenstack.engine.state import State

    alloc = PoolAllocation(PoolConfig(pool.db, "nlp"), run_id="r2", pool=pool)
    assert alloc.reserve_before_training() is None
    state = State(model=torch.nn.Linear(1, 1), max_steps=100, step=25, metrics={"carbon/total_kg_co2e": 0.5})
    fire(alloc, Event.EPOCH_END, state)
    assert alloc.decision.requested_kg == pytest.approx(2.0) and not state.stop
    state.metrics["carbon/total_kg_co2e"] = 1.9
    fire(alloc, Event.FIT_END, state)
    alloc.close()  # the runner never settled (e.g. a crash): settle with the last logged total
    assert pool.allocations()[-1]["settled_kg"] == pytest.approx(1.9)


def test_pool_config_validation_lists_every_problem():
    assert PoolConfig.from_node(None) is None
    declared = {"db": None, "participant": None, "reserve_kg": None, "on_denied": "stop", "zone": None}
    assert PoolConfig.from_node(declared) is None  # conf/carbon/*.yaml declare the keys: no pool
    with pytest.raises(ConfigError, match="carbon.pool.db"):
        PoolConfig.from_node({**declared, "participant": "vision"})
    with pytest.raises(ConfigError) as e:
        PoolConfig.from_node({"reserve_kg": -1, "on_denied": "maybe", "colour": "green"})
    keys = {p.key for p in e.value.problems}
    assert keys == {"carbon.pool.colour", "carbon.pool.db", "carbon.pool.participant", "carbon.pool.reserve_kg",
                    "carbon.pool.on_denied"}


# -- the command line --------------------------------------------------------------------------
def test_cli_pool_contract(cli, tmp_path):
    db = str(tmp_path / "cli.sqlite")
    created = cli("pool", "create", "--db", db, "--participant", "vision=10", "--participant", "nlp=5")
    assert created.returncode == 0, created.stderr
    ok = cli("pool", "request", "--db", db, "--participant", "vision", "--kg", "8", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "approved"
    premium = cli("pool", "request", "--db", db, "--participant", "vision", "--kg", "4", "--json")
    body = json.loads(premium.stdout)
    assert premium.returncode == 0 and body["status"] == "approved_premium" and body["charged_kg"] == 6.0
    denied = cli("pool", "request", "--db", db, "--participant", "nlp", "--kg", "3", "--json", "--zone", "GB")
    body = json.loads(denied.stdout)
    assert denied.returncode == 3 and body["status"] == "denied" and body["reason"]
    assert {a["kind"] for a in body["alternatives"]} >= {"reduce", "shift_region"}
    status = cli("pool", "status", "--db", db, "--json")
    body = json.loads(status.stdout)
    assert status.returncode == 0 and body["used_kg"] == 14.0 and body["total_kg"] == 15.0
    settled = cli("pool", "settle", "--db", db, "--id", "1", "--kg", "7.5")
    assert settled.returncode == 0 and "released 0.5 kg" in settled.stdout
    exported = cli("pool", "log", "--db", db, "--out", str(tmp_path / "pool.jsonl"))
    assert exported.returncode == 0
    assert cli("audit", "verify", str(tmp_path / "pool.jsonl")).returncode == 0
    assert cli("audit", "verify", "--db", db).returncode == 0
    unknown = cli("pool", "request", "--db", db, "--participant", "nobody", "--kg", "1")
    assert unknown.returncode == 2 and "not a participant" in unknown.stderr and "Traceback" not in unknown.stderr


def test_cli_pool_without_db_explains(cli):
    env = {k: v for k, v in os.environ.items() if k != "GREENSTACK_POOL_DB"}
    out = cli("pool", "status", env=env)
    assert out.returncode == 2 and "--db" in out.stderr


# -- issue 22: the tables are checked against the audited history; running balances; a keyed chain ---
def _sql(pool: CarbonPool, statement: str) -> None:
    with sqlite3.connect(pool.db) as conn:
        conn.execute(statement)


@pytest.mark.parametrize("forgery, expected", [
    ("UPDATE greenstack_participants SET budget_mg = 500000000 WHERE name = 'nlp'",
     "budget_mg of 'nlp' says 500 kg, the audited history 5 kg"),
    ("DELETE FROM greenstack_allocations WHERE id = 2", "allocation 2 is missing from greenstack_allocations"),
    ("UPDATE greenstack_allocations SET charged_mg = 1 WHERE id = 1", "charged_mg 1 (audited 3000000)"),
    ("UPDATE greenstack_participants SET used_mg = 0 WHERE name = 'vision'", "used_mg of 'vision' says 0 kg"),
    ("INSERT INTO greenstack_participants (name, budget_mg) VALUES ('mallory', 9000000)",
     "participant 'mallory' in greenstack_participants (budget 9 kg) has no audited record"),
])
def test_tables_edited_outside_greenstack_fail_verify_and_status(pool, forgery, expected):
    pool.request("vision", 3.0, alternatives=None)
    first = pool.request("nlp", 2.0, alternatives=None)
    pool.settle(first.allocation_id, 1.5)
    assert pool.verify_audit().ok and pool.status()["integrity"]["ok"]
    _sql(pool, forgery)
    result = pool.verify_audit()
    assert not result.ok and any(expected in p.reason for p in result.problems), result.problems
    status = pool.status()
    assert not status["integrity"]["ok"] and any(expected in p for p in status["integrity"]["problems"])


def test_cli_pool_status_and_audit_verify_refuse_a_forged_budget(pool, cli):
    pool.request("nlp", 2.0, alternatives=None)
    _sql(pool, "UPDATE greenstack_participants SET budget_mg = 500000000 WHERE name = 'nlp'")
    shown = cli("pool", "status", "--db", pool.db)
    assert shown.returncode == 1 and "TAMPERED" in shown.stdout
    assert "budget_mg of 'nlp' says 500 kg, the audited history 5 kg" in shown.stdout
    verified = cli("audit", "verify", "--db", pool.db)
    assert verified.returncode == 1 and "budget_mg of 'nlp'" in verified.stdout


def test_running_balances_match_the_allocations_and_old_pools_are_migrated(tmp_path):
    db = str(tmp_path / "old.sqlite")
    pool = CarbonPool.create(db, {"a": 10.0, "b": 4.0})
    pool.request("a", 6.0, alternatives=None)
    second = pool.request("a", 6.0, alternatives=None)  # over share, and the 9 kg premium > 8 kg free
    assert second.status == "denied"
    third = pool.request("b", 2.0, alternatives=None)
    pool.settle(third.allocation_id, 1.0)
    with sqlite3.connect(db) as conn:
        used = dict(conn.execute("SELECT name, used_mg FROM greenstack_participants"))
    assert used == {"a": 6_000_000 + round(second.charged_kg * 1e6), "b": 1_000_000}
    # a pool made before running balances and head MACs existed: the columns are added and filled on first use
    with sqlite3.connect(db) as conn:
        conn.execute("ALTER TABLE greenstack_participants DROP COLUMN used_mg")
        conn.execute("ALTER TABLE greenstack_pool DROP COLUMN audit_mac")
    reopened = CarbonPool(db)
    assert reopened.status()["integrity"]["ok"]
    with sqlite3.connect(db) as conn:
        assert dict(conn.execute("SELECT name, used_mg FROM greenstack_participants")) == used
    assert reopened.request("b", 3.0, alternatives=None).status == "approved"  # 1 + 3 <= 4
    assert reopened.verify_audit().ok


def test_keyed_pool_chain_and_head_need_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENSTACK_AUDIT_KEY", "pool-s3cret")
    db = str(tmp_path / "keyed.sqlite")
    pool = CarbonPool.create(db, {"a": 10.0})
    for kg in (1.0, 2.0, 3.0):
        pool.request("a", kg, alternatives=None)
    assert pool.verify_audit().ok and pool.verify_audit().keyed
    assert all(json.loads(line)["mac"] == "hmac-sha256" for line in pool.audit_lines()[0])
    # cut the last allocation everywhere and point the head at the new last line: the head's MAC fails
    with sqlite3.connect(db) as conn:
        line = conn.execute("SELECT line FROM greenstack_audit WHERE seq = 3").fetchone()[0]
        conn.execute("DELETE FROM greenstack_audit WHERE seq = 4")
        conn.execute("DELETE FROM greenstack_allocations WHERE id = 3")
        conn.execute("UPDATE greenstack_participants SET used_mg = 3000000")
        conn.execute("UPDATE greenstack_pool SET audit_seq = 3, audit_hash = ?", (json.loads(line)["hash"],))
    result = pool.verify_audit()
    assert not result.ok and any("MAC" in p.reason for p in result.problems)
    monkeypatch.delenv("GREENSTACK_AUDIT_KEY")
    assert not CarbonPool(db).verify_audit().ok  # and without the key the keyed hashes do not verify
