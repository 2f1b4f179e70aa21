"""The carbon pool on a real PostgreSQL server (tests/infra/postgres.sh, started by .ci/run).

Locally these tests skip without GREENSTACK_TEST_PG_URL; in CI (CI set) a missing server is a failure.
"""

from __future__ import annotations

import json
import os
import uuid

import pytest

from greenstack.errors import ConfigError
from greenstack.ledger.pool import CarbonPool
from tests.unit.test_pool import check_race

PG_URL = os.environ.get("GREENSTACK_TEST_PG_URL")


def _with_db(url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


@pytest.fixture
def pg_url():
    """A fresh, empty database on the test server (dropped afterwards)."""
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail("CI must start PostgreSQL (bash tests/infra/postgres.sh) and export GREENSTACK_TEST_PG_URL")
        pytest.skip("no PostgreSQL: run `bash tests/infra/postgres.sh` and export GREENSTACK_TEST_PG_URL")
    psycopg = pytest.importorskip("psycopg") if not os.environ.get("CI") else __import__("psycopg")
    name = f"greenstack_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_db(PG_URL, name)
    finally:
        with psycopg.connect(PG_URL, autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_32_concurrent_processes_never_exceed_the_pool_postgres(pg_url, tmp_path):
    check_race(pg_url, tmp_path)


def test_rules_reserve_settle_and_audit_on_postgres(pg_url):
    pool = CarbonPool.create(pg_url, {"vision": 10.0, "nlp": 5.0})
    assert pool.request("vision", 8.0, alternatives=None).status == "approved"
    premium = pool.request("vision", 4.0, alternatives=None)
    assert (premium.status, premium.charged_kg) == ("approved_premium", 6.0)
    assert pool.request("nlp", 2.0, alternatives=None).status == "denied"  # 1 kg free
    out = pool.settle(premium.allocation_id, 2.0)
    assert out["charged_kg"] == 3.0 and out["released_kg"] == 3.0
    status = pool.status()
    assert (status["backend"], status["used_kg"], status["remaining_kg"]) == ("postgresql", 11.0, 4.0)
    assert pool.verify_audit().ok and status["audit"]["records"] == 5
    with pytest.raises(ConfigError, match="already holds a carbon pool"):
        CarbonPool.create(pg_url, {"x": 1.0})


def test_tampered_pool_log_in_postgres_is_named(pg_url):
    import psycopg

    pool = CarbonPool.create(pg_url, {"a": 1.0})
    pool.request("a", 0.5, alternatives=None)
    pool.request("a", 0.25, alternatives=None)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM greenstack_audit WHERE seq = 2")
    result = pool.verify_audit()
    assert not result.ok and result.first_bad_line == 2 and "deleted" in result.problems[0].reason


def test_cli_against_postgres(cli, pg_url):
    assert cli("pool", "create", "--db", pg_url, "--participant", "a=2", "--participant", "b=1").returncode == 0
    ok = cli("pool", "request", "--db", pg_url, "--participant", "a", "--kg", "1.5", "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["status"] == "approved"
    denied = cli("pool", "request", "--db", pg_url, "--participant", "a", "--kg", "2", "--json", "--no-alternatives")
    assert denied.returncode == 3 and json.loads(denied.stdout)["status"] == "denied"
    status = json.loads(cli("pool", "status", "--db", pg_url, "--json").stdout)
    assert status["used_kg"] == 1.5 and status["backend"] == "postgresql"
    assert cli("audit", "verify", "--db", pg_url).returncode == 0


def test_ledger_edited_in_postgres_fails_verify_and_status(pg_url):
    import psycopg

    pool = CarbonPool.create(pg_url, {"a": 1.0, "b": 2.0})
    pool.request("a", 0.5, alternatives=None)
    pool.request("b", 0.25, alternatives=None)
    assert pool.verify_audit().ok and pool.status()["integrity"]["ok"]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE greenstack_participants SET budget_mg = 900000000 WHERE name = 'a'")
        conn.execute("DELETE FROM greenstack_allocations WHERE id = 2")
    problems = [p.reason for p in pool.verify_audit().problems]
    assert any("budget_mg of 'a' says 900 kg, the audited history 1 kg" in p for p in problems)
    assert any("allocation 2 is missing" in p for p in problems)
    assert not pool.status()["integrity"]["ok"]
