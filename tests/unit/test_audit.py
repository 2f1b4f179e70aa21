"""Hash-chained audit log: every edit, insertion, deletion or reordering is caught and its line named."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from greenstack.engine.audit_trail import attach_to_recorders, record_policy_decisions
from greenstack.engine.policy import Policy
from greenstack.ledger.audit import (
    GENESIS,
    AuditLog,
    canonical,
    digest,
    head_path,
    verify,
)
from greenstack.scheduling.decisions import Decision, DecisionRecorder

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "runs" / "small" / "audit.jsonl"


@pytest.fixture
def log(tmp_path) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl", actor="test")
    kinds = ["schedule", "region", "pause", "alert", "allocation", "compression"]
    for i, kind in enumerate(kinds):
        log.append(kind, {"i": i, "reason": f"decision {i}", "value": i * 0.5})
    return log


def tampered(log: AuditLog, lines: list[str], *, keep_head: bool = True) -> Path:
    out = log.path.with_name("tampered.jsonl")
    out.write_text("".join(line + "\n" for line in lines))
    if keep_head:
        shutil.copy(head_path(log.path), head_path(out))
    return out


def rehash(line: str, **changes) -> str:
    record = json.loads(line)
    record.update(changes)
    body = {k: v for k, v in record.items() if k != "hash"}
    return canonical({**body, "hash": digest(body)})


def lines_of(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines()


def test_intact_log_verifies_with_sequence_chain_and_head(log):
    result = verify(log.path)
    assert result.ok and result.lines == 6 and result.head_checked
    records = log.records()
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev"] == GENESIS
    assert all(records[i]["prev"] == records[i - 1]["hash"] for i in range(1, 6))
    assert json.loads(head_path(log.path).read_text()) == {"seq": 6, "hash": records[-1]["hash"]}


def test_edited_value_names_the_line(log):
    lines = lines_of(log)
    lines[2] = lines[2].replace('"value":1.0', '"value":0.1')
    result = verify(tampered(log, lines))
    assert not result.ok and result.first_bad_line == 3
    assert "edited" in result.problems[0].reason


def test_edit_with_recomputed_hash_still_names_the_line(log):
    lines = lines_of(log)
    lines[3] = rehash(lines[3], data={"i": 3, "reason": "forged", "value": 9.0})
    result = verify(tampered(log, lines))
    assert not result.ok and result.first_bad_line == 4


def test_whitespace_only_edit_is_caught(log):
    lines = lines_of(log)
    lines[1] = lines[1].replace('","', '", "', 1)
    assert json.loads(lines[1]) == json.loads(lines_of(log)[1])  # same content, different bytes
    result = verify(tampered(log, lines))
    assert result.first_bad_line == 2 and "canonical" in result.problems[0].reason


@pytest.mark.parametrize("index", [0, 2, 5])
def test_deleted_line_is_named(log, index):
    lines = lines_of(log)
    del lines[index]
    result = verify(tampered(log, lines))
    assert not result.ok
    assert result.first_bad_line == index + 1
    assert "deleted" in result.problems[0].reason


def test_forged_insertion_is_named(log):
    lines = lines_of(log)
    forged = rehash(lines[2], data={"i": 99, "reason": "inserted"})  # seq 3, chains to line 2, valid hash
    lines.insert(2, forged)
    result = verify(tampered(log, lines))
    assert result.first_bad_line == 3 and "inserted" in result.problems[0].reason


def test_junk_insertion_and_duplicate_are_named(log):
    lines = lines_of(log)
    result = verify(tampered(log, [*lines[:4], '{"note": "hi"}', *lines[4:]]))
    assert result.first_bad_line == 5
    result = verify(tampered(log, [*lines, lines[-1]]))
    assert result.first_bad_line == 7 and "copy of line 6" in result.problems[0].reason


def test_swapped_lines_are_caught(log):
    lines = lines_of(log)
    lines[1], lines[2] = lines[2], lines[1]
    result = verify(tampered(log, lines))
    assert result.first_bad_line == 2


def test_tail_truncation_needs_the_head(log):
    lines = lines_of(log)[:-2]
    result = verify(tampered(log, lines))
    assert not result.ok and result.first_bad_line == 5 and "deleted" in result.problems[0].reason
    # without the head file the chain alone cannot see a cut tail: verify says so instead of passing
    bare = tampered(log, lines, keep_head=False)
    head_path(bare).unlink(missing_ok=True)
    assert not verify(bare).ok
    assert verify(bare, require_head=False).ok


def test_hmac_key_protects_against_rewriting_the_whole_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENSTACK_AUDIT_KEY", "s3cret")
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(3):
        log.append("schedule", {"i": i})
    assert verify(log.path).ok
    monkeypatch.delenv("GREENSTACK_AUDIT_KEY")
    assert verify(log.path).first_bad_line == 1  # plain SHA-256 does not reproduce keyed hashes


def test_concurrent_writers_keep_one_chain(tmp_path):
    path = tmp_path / "audit.jsonl"
    code = ("import sys; from greenstack.ledger.audit import AuditLog\n"
            "log = AuditLog(sys.argv[1], actor=sys.argv[2])\n"
            "for i in range(10): log.append('alert', {'writer': sys.argv[2], 'i': i})\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), f"w{n}"]) for n in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    result = verify(path)
    assert result.ok and result.lines == 40


def test_only_rank_zero_writes_the_run_log(tmp_path, monkeypatch):
    from greenstack.ledger.audit import run_audit_log

    monkeypatch.setenv("RANK", "1")
    assert run_audit_log(tmp_path).append("alert", {"x": 1}) == {}
    assert not (tmp_path / "audit.jsonl").exists()
    monkeypatch.delenv("RANK")
    assert run_audit_log(tmp_path).append("alert", {"x": 1})["seq"] == 1


def test_shipped_fixture_log_verifies():
    assert verify(FIXTURE).ok


def test_cli_verify_exit_codes_and_line(cli, log):
    ok = cli("audit", "verify", str(log.path))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK" in ok.stdout
    lines = lines_of(log)
    lines[4] = lines[4].replace('"i":4', '"i":40')
    bad = cli("audit", "verify", str(tampered(log, lines)))
    assert bad.returncode == 1
    assert "line 5" in bad.stdout
    js = cli("audit", "verify", str(tampered(log, lines)), "--json")
    assert json.loads(js.stdout)["problems"][0]["line"] == 5
    missing = cli("audit", "verify", str(log.path.parent / "nope.jsonl"))
    assert missing.returncode == 2 and "Traceback" not in missing.stderr


class _Scheduler(Policy):
    """A scheduler's shape: decisions go through a recorder the audit log listens to as they are taken."""

    audit_kind = "schedule"

    def __init__(self) -> None:
        super().__init__(name="forecast_window")
        self.recorder = DecisionRecorder("forecast_window")

    def recorded_decisions(self) -> list[dict]:
        return self.recorder.decisions

    def decision_recorder(self) -> DecisionRecorder:
        return self.recorder


class _Alerts(Policy):
    """An efficiency policy's shape: a plain list of decisions, written at the end of the run."""

    audit_kind = "alert"

    def __init__(self) -> None:
        super().__init__(name="alerts")
        self.decisions = [{"alert": "low_gpu_utilization", "value": 12.0, "threshold": 40.0}]

    def recorded_decisions(self) -> list[dict]:
        return self.decisions


def test_policy_decisions_reach_the_run_log_once(tmp_path):
    audit = AuditLog(tmp_path / "audit.jsonl")
    sched, alerts = _Scheduler(), _Alerts()
    assert attach_to_recorders(audit, [sched, alerts]) == 1
    assert attach_to_recorders(audit, [sched]) == 0  # never hooked twice
    at = datetime(2024, 5, 6, 9, tzinfo=timezone.utc)
    sched.recorder.record(Decision(policy="forecast_window", action="wait", at=at, inputs={},
                                   choice={"start": "2024-05-06T10:00Z"}))
    sched.recorder.record(Decision(policy="pause_resume", action="pause", at=at, inputs={}, choice={}))
    assert record_policy_decisions(audit, [sched, alerts]) == 1  # the scheduler's went live already
    assert record_policy_decisions(audit, [sched, alerts]) == 0  # a resumed run does not duplicate them
    kinds = [r["kind"] for r in audit.records()]
    assert kinds == ["schedule", "pause", "alert"]
    assert verify(audit.path).ok


# -- issue 22.1: an authenticated head, and anchors that show a cut tail ------------------------------
def _cut_tail_and_rewrite_head(path: Path, n: int) -> None:
    """The attack: drop the last n lines and write a head naming the new last line."""
    lines = path.read_text().splitlines()[:-n]
    path.write_text("".join(line + "\n" for line in lines))
    last = json.loads(lines[-1])
    head_path(path).write_text(canonical({"seq": last["seq"], "hash": last["hash"]}) + "\n")


def test_keyed_head_is_authenticated_so_a_cut_tail_with_rewritten_head_fails(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENSTACK_AUDIT_KEY", "s3cret")
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(5):
        log.append("schedule", {"i": i})
    result = verify(log.path)
    assert result.ok and result.keyed and result.notes == []
    _cut_tail_and_rewrite_head(log.path, 2)
    result = verify(log.path)
    assert not result.ok and any("MAC" in p.reason and "rewritten" in p.reason for p in result.problems)


def test_unkeyed_verify_says_what_it_cannot_detect(log):
    result = verify(log.path)
    assert result.ok and not result.keyed
    assert any("GREENSTACK_AUDIT_KEY" in note and "rewrite" in note for note in result.notes)


def _finished_run(run_dir: Path) -> AuditLog:
    from greenstack.ledger.audit import anchor_run

    log = AuditLog(run_dir / "audit.jsonl", actor="run x")
    for i in range(6):
        log.append("schedule", {"i": i})
    (run_dir / "sustainability.json").write_text(json.dumps({"schema": "greenstack.sustainability/1"}))

    class Tracker:
        summary_values: dict = {}

        def summary(self, values):
            self.summary_values = values
            files = run_dir / "wandb" / "offline-run-20260101_000000-x" / "files"
            files.mkdir(parents=True, exist_ok=True)
            (files / "wandb-summary.json").write_text(json.dumps(values))

    anchor = anchor_run(run_dir, log, Tracker())
    assert anchor is not None and anchor["seq"] == 6
    return log


@pytest.mark.parametrize("keyed", [False, True])
def test_run_anchors_catch_a_cut_tail_even_with_a_consistent_head(tmp_path, monkeypatch, keyed):
    from greenstack.ledger.audit import verify_run

    if keyed:
        monkeypatch.setenv("GREENSTACK_AUDIT_KEY", "s3cret")
    log = _finished_run(tmp_path)
    result = verify_run(log.path)
    assert result.ok, result.problems
    assert set(result.anchors_checked) == {"sustainability.json",
                                           "wandb/offline-run-20260101_000000-x/files/wandb-summary.json"}
    _cut_tail_and_rewrite_head(log.path, 2)
    if not keyed:
        assert verify(log.path).ok  # the chain and a rewritten plain head alone cannot show it ...
    result = verify_run(log.path)  # ... the anchors do
    reasons = [p.format() for p in result.problems]
    assert not result.ok and any("sustainability.json anchors 6 lines, the log has 4" in r for r in reasons)
    assert any("wandb-summary.json anchors 6 lines" in r for r in reasons)


def test_anchor_catches_an_edited_anchored_line_and_appends_after_the_end(tmp_path):
    from greenstack.ledger.audit import verify_run

    log = _finished_run(tmp_path)
    lines = lines_of(log)
    lines[5] = rehash(lines[5], data={"i": 99})  # last line edited, hash recomputed, head rewritten
    log.path.write_text("".join(line + "\n" for line in lines))
    head_path(log.path).write_text(canonical({"seq": 6, "hash": json.loads(lines[5])["hash"]}) + "\n")
    assert verify(log.path).ok
    result = verify_run(log.path)
    assert not result.ok and result.first_bad_line == 6 and "differs from the line" in result.problems[0].reason
    log2 = _finished_run(tmp_path / "b" if (tmp_path / "b").mkdir() is None else tmp_path)
    log2.append("alert", {"late": True})
    result = verify_run(log2.path)
    assert not result.ok and "appended after the run ended" in result.problems[0].reason


def test_cli_audit_verify_of_a_run_dir_reports_the_cut_tail(cli, tmp_path):
    log = _finished_run(tmp_path)
    ok = cli("audit", "verify", str(tmp_path))
    assert ok.returncode == 0 and "anchors match" in ok.stdout and "GREENSTACK_AUDIT_KEY" in ok.stdout
    _cut_tail_and_rewrite_head(log.path, 3)
    bad = cli("audit", "verify", str(tmp_path))
    assert bad.returncode == 1 and "TAMPERED" in bad.stdout and "lines 4-6 were deleted" in bad.stdout


def test_anchors_of_a_run_apply_only_to_its_own_audit_jsonl(tmp_path):
    from greenstack.ledger.audit import verify_run

    _finished_run(tmp_path)
    other = AuditLog(tmp_path / "pool-export.jsonl")
    other.append("pool", {"action": "create"})
    result = verify_run(other.path)
    assert result.ok and result.anchors_checked == []
