"""Hash-chained audit log: every decision a run (or a carbon pool) takes, in a file nobody can quietly edit.

Why a chain: scheduling, region, pause, alert, allocation and compression decisions change what a run
emits, so a later reader must be able to trust that the log was not edited after the fact. Each JSONL
line carries its sequence number (1-based, equal to its line number), the hash of the previous line and
its own SHA-256 over its canonical JSON, so editing, inserting, deleting or reordering a line breaks the
chain at a line `verify` can name. A deleted *tail* leaves a valid chain; the head file written next to
the log (`PATH.head`, the last sequence number and hash) catches that. With `GREENSTACK_AUDIT_KEY` set the
hashes become HMAC-SHA256 under that key and the head carries its own MAC, so rewriting lines, the chain
or the head (e.g. after cutting the tail) needs the key. Without a key everything is plain SHA-256:
whoever can write the files can rewrite them consistently, which only anchors kept elsewhere reveal.

Anchors: a run copies its final head into `sustainability.json` and the W&B summary, and each checkpoint
manifest holds the head at the time it was written; `verify_run` checks the log against every one of
them (a tail cut after the anchor, or an edited anchored line, shows).

Lines are written in canonical form (sorted keys, no spaces), so even a whitespace-only edit is caught.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from greenstack.io import jsonable

SCHEMA = "greenstack.audit/1"
GENESIS = "0" * 64
KEY_ENV = "GREENSTACK_AUDIT_KEY"
#: decision kinds greenstack writes; other kinds are accepted (a policy may add its own)
DECISION_KINDS = ("schedule", "region", "pause", "alert", "allocation", "settlement", "compression",
                  "budget", "pool", "checkpoint")


def canonical(obj: Mapping[str, Any]) -> str:
    """The one serialisation that is hashed and written: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def audit_key() -> bytes | None:
    """The HMAC key of audit logs from the environment (None: hash chain only, no key)."""
    key = os.environ.get(KEY_ENV)
    return key.encode() if key else None


def digest(body: Mapping[str, Any], key: bytes | None = None) -> str:
    """SHA-256 (or HMAC-SHA256 under `key`) of a record without its `hash` field."""
    data = canonical(body).encode()
    return hmac.new(key, data, hashlib.sha256).hexdigest() if key else hashlib.sha256(data).hexdigest()


def head_mac(key: bytes, seq: int, hash_: str) -> str:
    """MAC of a head (last sequence number and hash): only a key holder can name a new end of the log."""
    return hmac.new(key, f"greenstack.audit.head/1|{int(seq)}|{hash_}".encode(), hashlib.sha256).hexdigest()


def make_head(seq: int, hash_: str, key: bytes | None = None, **extra: Any) -> dict[str, Any]:
    """The head of a log (`{"seq", "hash"}`, plus `"mac"` under a key): for head files, pool rows, anchors."""
    head: dict[str, Any] = {"seq": int(seq), "hash": str(hash_), **extra}
    if key:
        head["mac"] = head_mac(key, int(seq), str(hash_))
    return head


def _head_mac_problem(head: Mapping[str, Any], key: bytes | None, what: str) -> str | None:
    """Why a head/anchor is not authentic under `key` (None when it is, or when there is no key)."""
    if not key:
        return None
    mac = head.get("mac")
    try:
        good = isinstance(mac, str) and hmac.compare_digest(mac, head_mac(key, int(head.get("seq", -1)),
                                                                          str(head.get("hash", ""))))
    except (TypeError, ValueError):
        good = False
    if good:
        return None
    return (f"{what} has {'no' if not mac else 'a wrong'} MAC under GREENSTACK_AUDIT_KEY: it was rewritten "
            "(e.g. after deleting the last lines) or written without the key")


UNKEYED_NOTE = ("no GREENSTACK_AUDIT_KEY: lines, head and local anchors are plain SHA-256, so someone who can "
                "write these files can edit or cut the log and rewrite them all consistently; only anchors kept "
                "elsewhere (the W&B summary of an online run, checkpoints on remote storage) would show it")


def make_record(seq: int, prev: str, kind: str, data: Mapping[str, Any], *, actor: str | None = None,
                at: datetime | None = None, key: bytes | None = None) -> dict[str, Any]:
    """One chained record (with its hash) following the record whose hash is `prev`."""
    if not kind or not isinstance(kind, str):
        raise ValueError(f"audit kind must be a non-empty string, got {kind!r}")
    body: dict[str, Any] = {
        "schema": SCHEMA, "seq": int(seq), "prev": prev, "kind": kind,
        "at": (at or datetime.now(timezone.utc)).astimezone(timezone.utc).isoformat(timespec="microseconds"),
        "data": jsonable(dict(data)),
    }
    if actor:
        body["actor"] = str(actor)
    if key:
        body["mac"] = "hmac-sha256"
    return {**body, "hash": digest(body, key)}


def chain_next(last_line: str | None, kind: str, data: Mapping[str, Any], *, actor: str | None = None,
               key: bytes | None = None) -> tuple[dict[str, Any], str]:
    """The record (and its canonical line) that follows `last_line` (None for the first record)."""
    if last_line is None:
        seq, prev = 1, GENESIS
    else:
        last = json.loads(last_line)
        seq, prev = int(last["seq"]) + 1, str(last["hash"])
    record = make_record(seq, prev, kind, data, actor=actor, key=key)
    return record, canonical(record)


@dataclass(frozen=True)
class AuditProblem:
    """Where the chain breaks: the 1-based line number and what is wrong there."""

    line: int
    reason: str

    def format(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class VerifyResult:
    """Outcome of `verify`: ok only when every line checks out and the head (if any) matches."""

    path: str
    lines: int
    problems: list[AuditProblem] = field(default_factory=list)
    head_checked: bool = False
    keyed: bool = False
    anchors_checked: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    hashes: list[str] = field(default_factory=list, repr=False)  # each line's hash, for anchor checks

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_bad_line(self) -> int | None:
        return self.problems[0].line if self.problems else None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "ok": self.ok, "lines": self.lines, "head_checked": self.head_checked,
                "keyed": self.keyed, "anchors_checked": self.anchors_checked, "notes": self.notes,
                "problems": [{"line": p.line, "reason": p.reason} for p in self.problems]}


def verify_lines(lines: Sequence[str], *, head: Mapping[str, Any] | None = None, key: bytes | None = None,
                 source: str = "<lines>") -> VerifyResult:
    """Check a chain given as raw lines (a file's, or exported from a pool's database).

    Reports the first break in the chain (later lines are only re-checked for their own hashes, since a
    single insertion or deletion shifts every following sequence number) and a head mismatch.
    """
    result = VerifyResult(path=source, lines=len(lines), keyed=key is not None,
                          notes=[] if key else [UNKEYED_NOTE])
    problems = result.problems
    hashes: list[str] = []  # hash field of each line so far
    prev_ok = True
    chain_broken = False
    for n, raw in enumerate(lines, start=1):
        text = raw.rstrip("\n")
        prev_hash = hashes[-1] if hashes else GENESIS
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            problems.append(AuditProblem(n, f"not a JSON record ({e}): edited or inserted"))
            chain_broken, prev_ok = True, False
            hashes.append("")
            continue
        missing = [k for k in ("seq", "prev", "kind", "at", "data", "hash") if k not in record]
        if missing:
            problems.append(AuditProblem(n, f"record lacks {', '.join(missing)}: edited or inserted"))
            chain_broken, prev_ok = True, False
            hashes.append(str(record.get("hash", "")))
            continue
        body = {k: v for k, v in record.items() if k != "hash"}
        own_ok = hmac.compare_digest(str(record["hash"]), digest(body, key))
        if not own_ok:
            problems.append(AuditProblem(n, "content does not match its hash: this line was edited"
                                            + ("" if key else " (or it was written under GREENSTACK_AUDIT_KEY)")))
        elif canonical(record) != text:
            problems.append(AuditProblem(n, "line is not in canonical form: this line was edited"))
        seq = record["seq"]
        if not chain_broken and seq != n:
            chain_broken = True
            if n >= 2 and text == lines[n - 2].rstrip("\n"):
                problems.append(AuditProblem(n, f"inserted: a copy of line {n - 1}"))
            elif seq == n - 1 and n >= 2 and record["prev"] == (hashes[-2] if n >= 3 else GENESIS):
                problems.append(AuditProblem(n - 1, f"inserted: line {n} carries sequence {n - 1} and also "
                                                    f"chains to line {n - 2}"))
            elif isinstance(seq, int) and not isinstance(seq, bool) and seq > n:
                gone = f"line {n} of the original log was" if seq == n + 1 else \
                    f"lines {n}-{seq - 1} of the original log were"
                problems.append(AuditProblem(n, f"sequence number {seq}, expected {n}: {gone} deleted "
                                                "(or lines were moved)"))
            else:
                problems.append(AuditProblem(n, f"sequence number {seq!r}, expected {n}: a line was inserted "
                                                "or moved here"))
        elif not chain_broken and record["prev"] != prev_hash and own_ok:
            chain_broken = True
            if n == 1:
                problems.append(AuditProblem(1, "first line does not start the chain: earlier lines were deleted "
                                                "or this line was replaced"))
            elif prev_ok:
                problems.append(AuditProblem(n - 1, f"edited or replaced (its hash was recomputed): line {n} "
                                                    "no longer chains to it"))
            else:
                problems.append(AuditProblem(n, f"does not chain to line {n - 1}"))
        hashes.append(str(record["hash"]))
        prev_ok = own_ok
    prev_hash = hashes[-1] if hashes else GENESIS
    if head is not None:
        result.head_checked = True
        want_n, want_hash = int(head.get("seq", -1)), str(head.get("hash", ""))
        if want_n > len(lines):
            gone = f"line {want_n} was" if want_n == len(lines) + 1 else f"lines {len(lines) + 1}-{want_n} were"
            problems.append(AuditProblem(len(lines) + 1, f"missing: the head records {want_n} lines, the log "
                                                         f"has {len(lines)} ({gone} deleted)"))
        elif want_n < len(lines):
            problems.append(AuditProblem(want_n + 1, f"appended after the last recorded line {want_n} "
                                                     "(inserted without updating the head)"))
        elif lines and prev_hash != want_hash:
            problems.append(AuditProblem(len(lines), "last line differs from the one the head recorded: "
                                                     "edited or replaced"))
        forged = _head_mac_problem(head, key, "the head")
        if forged:
            problems.append(AuditProblem(len(lines), forged))
    result.hashes = hashes
    problems.sort(key=lambda p: p.line)
    return result


def head_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".head")


def verify(path: str | Path, *, require_head: bool = True, key: bytes | None = None) -> VerifyResult:
    """Verify a JSONL audit file (and its head file); see `verify_lines`.

    A missing head file is itself a problem unless `require_head=False`: without it, deleting the last
    lines cannot be detected.
    """
    path = Path(path)
    key = audit_key() if key is None else key
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    head = None
    hp = head_path(path)
    if hp.is_file():
        try:
            head = json.loads(hp.read_text(encoding="utf-8"))
        except ValueError:
            head = {"seq": -1, "hash": ""}
    result = verify_lines(lines, head=head, key=key, source=str(path))
    if head is None and require_head:
        result.problems.append(AuditProblem(len(lines), f"head file {hp.name} is missing, so deleted tail lines "
                                                        "cannot be ruled out (pass --no-head to check only "
                                                        "the chain)"))
    if text and not text.endswith("\n"):
        result.problems.append(AuditProblem(len(lines), "last line is not newline-terminated: truncated"))
    return result


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive lock on the log itself so concurrent writers (threads, processes, ranks) never fork the chain."""
    import fcntl

    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _last_line(path: Path) -> str | None:
    if not path.is_file() or path.stat().st_size == 0:
        return None
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        block, data = 4096, b""
        while size > 0 and data.count(b"\n") < 2:
            step = min(block, size)
            size -= step
            f.seek(size)
            data = f.read(step) + data
    lines = [ln for ln in data.split(b"\n") if ln.strip()]
    return lines[-1].decode("utf-8") if lines else None


RUN_AUDIT_FILE = "audit.jsonl"
_ACTION_KINDS = {"pause": "pause", "resume": "pause", "arm": "pause", "choose_region": "region"}


def decision_kind(record: Mapping[str, Any], default: str = "schedule") -> str:
    """Audit kind of a scheduler decision record from its `action` (pause/resume -> pause, region choice -> region)."""
    return _ACTION_KINDS.get(str(record.get("action", "")), default)


def run_audit_log(run_dir: str | Path, *, actor: str | None = None) -> AuditLog:
    """The decision log of a run (`<run_dir>/audit.jsonl`); policies call this with `state.run_dir`.

    Only global rank 0 writes (RANK unset counts as 0), so a multi-process run records each decision
    once. For the report to shade a scheduler's chosen window, a `schedule` (or `region`) record carries
    `{"window": {"start": ISO, "end": ISO}}` or a scheduler decision's `choice.start` + `inputs.duration_h`.
    """
    rank = int(os.environ.get("RANK", "0") or 0)
    return AuditLog(Path(run_dir) / RUN_AUDIT_FILE, actor=actor, enabled=rank == 0)


class AuditLog:
    """Append-only, hash-chained JSONL decision log (`audit.jsonl` in the run dir by default)."""

    def __init__(self, path: str | Path, *, actor: str | None = None, enabled: bool = True) -> None:
        self.path = Path(path)
        self.actor = actor
        self.enabled = enabled  # False on non-zero ranks: one writer per run

    def append(self, kind: str, data: Mapping[str, Any] | None = None, **fields: Any) -> dict[str, Any]:
        """Record one decision; returns the written record ({} when disabled). Safe under concurrent writers."""
        if not self.enabled:
            return {}
        payload = {**(data or {}), **fields}
        key = audit_key()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            record, line = chain_next(_last_line(self.path), kind, payload, actor=self.actor, key=key)
            with self.path.open("a", encoding="utf-8") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            from greenstack.io import atomic_write_bytes

            atomic_write_bytes(head_path(self.path),
                               (canonical(make_head(record["seq"], record["hash"], key)) + "\n").encode())
        return record

    def listener(self, kind: str | None = None) -> Callable[[Mapping[str, Any]], None]:
        """A callback for decision recorders (e.g. `recorder.listeners.append(audit.listener())`): each
        decision dict is appended as it is taken; the kind comes from its `action` unless given."""
        def append(record: Mapping[str, Any]) -> None:
            self.append(kind or decision_kind(record), record)

        return append

    def records(self) -> list[dict[str, Any]]:
        """Every record, parsed (no verification: call `verify` for that)."""
        if not self.path.is_file():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def verify(self) -> VerifyResult:
        return verify(self.path)

    def anchor(self) -> dict[str, Any] | None:
        """The log's current head as an anchor to copy elsewhere (None when the log is empty or disabled)."""
        return current_anchor(self.path) if self.enabled else None


# -- anchors: copies of the head kept where tampering shows ------------------------------------------
ANCHOR_KEY = "audit"  # in sustainability.json and checkpoint manifests (`audit_head` there)
WANDB_PREFIX = "audit/head_"


def current_anchor(path: str | Path, key: bytes | None = None) -> dict[str, Any] | None:
    """`{"seq", "hash", "first", "mac"?}` of the log at `path` now: its last line, and its first line's
    hash (which names the log, so an anchor from another run's log is recognised as such)."""
    path = Path(path)
    last = _last_line(path)
    if last is None:
        return None
    with path.open("rb") as f:
        first = json.loads(f.readline().decode("utf-8"))
    record = json.loads(last)
    return make_head(int(record["seq"]), str(record["hash"]), audit_key() if key is None else key,
                     first=str(first.get("hash", "")))


def anchor_run(run_dir: str | Path, audit: AuditLog, tracker: Any = None) -> dict[str, Any] | None:
    """At the end of a run: copy the log's final head into `sustainability.json` (when the run wrote one)
    and the tracker's summary (W&B: `audit/head_seq`, `audit/head_hash`, ...)."""
    anchor = audit.anchor()
    if anchor is None:
        return None
    summary_path = Path(run_dir) / "sustainability.json"
    if summary_path.is_file():
        from greenstack.io import atomic_write_json

        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        summary[ANCHOR_KEY] = anchor
        atomic_write_json(summary_path, summary)
    if tracker is not None:
        tracker.summary({f"{WANDB_PREFIX}{k}": v for k, v in anchor.items()})
    return anchor


def find_anchors(run_dir: str | Path) -> list[tuple[str, dict[str, Any], bool]]:
    """Anchors of the run in `run_dir`: (where, anchor, is_final). Final: sustainability.json and the
    newest W&B summary; the others (older W&B runs of a resumed run, checkpoint manifests) hold an
    earlier head, which the log must still contain unchanged."""
    run_dir = Path(run_dir)
    found: list[tuple[str, dict[str, Any], bool]] = []

    def load(path: Path) -> Any:
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError):
            return None

    summary = load(run_dir / "sustainability.json")
    if isinstance(summary, dict) and isinstance(summary.get(ANCHOR_KEY), dict):
        found.append(("sustainability.json", summary[ANCHOR_KEY], True))
    wandb = sorted((p for p in run_dir.glob("wandb/*run-*") if p.is_dir() and not p.is_symlink()), key=lambda p: p.name)
    for i, folder in enumerate(wandb):  # online runs keep files/wandb-summary.json, offline ones only the .wandb
        path, data = folder / "files" / "wandb-summary.json", None
        if path.is_file():
            data = load(path)
        else:
            for path in sorted(folder.glob("run-*.wandb")):
                try:
                    from greenstack.tracking.wandb_file import read_summary

                    data = read_summary(path)
                except (ImportError, OSError, ValueError, struct.error):
                    data = None  # no wandb, or a file being written: nothing to check there
        if isinstance(data, dict) and f"{WANDB_PREFIX}seq" in data:
            anchor = {k[len(WANDB_PREFIX):]: v for k, v in data.items() if k.startswith(WANDB_PREFIX)}
            found.append((str(path.relative_to(run_dir)), anchor, i == len(wandb) - 1))
    for path in sorted(run_dir.glob("**/manifest.json")):
        data = load(path)
        if isinstance(data, dict) and isinstance(data.get("audit_head"), dict):
            found.append((str(path.relative_to(run_dir)), data["audit_head"], False))
    return found


def check_anchors(result: VerifyResult, anchors: Sequence[tuple[str, Mapping[str, Any], bool]], *,
                  key: bytes | None = None) -> VerifyResult:
    """Add to `result` every way the log disagrees with an anchor (see `find_anchors`)."""
    key = audit_key() if key is None else key
    hashes, n = result.hashes, result.lines
    first = hashes[0] if hashes else ""
    for where, anchor, final in anchors:
        try:
            seq, hash_ = int(anchor.get("seq", -1)), str(anchor.get("hash", ""))
        except (TypeError, ValueError):
            result.problems.append(AuditProblem(n, f"the anchor in {where} is malformed: edited"))
            continue
        if not final and anchor.get("first") and anchor.get("first") != first:
            result.notes.append(f"{where}: the head of another log (a checkpoint of another run), not checked")
            continue
        result.anchors_checked.append(where)
        forged = _head_mac_problem(anchor, key, f"the anchor in {where}")
        if forged:
            result.problems.append(AuditProblem(min(max(seq, 1), max(n, 1)), forged))
        if seq > n:
            gone = f"line {seq} was" if seq == n + 1 else f"lines {n + 1}-{seq} were"
            result.problems.append(AuditProblem(n + 1, f"missing: {where} anchors {seq} lines, the log has {n} "
                                                       f"({gone} deleted, and the head rewritten)"))
        elif seq >= 1 and hashes[seq - 1] != hash_:
            result.problems.append(AuditProblem(seq, f"differs from the line {where} anchors: edited or replaced"))
        elif final and seq < n:
            result.problems.append(AuditProblem(seq + 1, f"appended after the run ended ({where} anchors {seq} "
                                                         "lines)"))
    result.problems.sort(key=lambda p: p.line)
    return result


def verify_run(path: str | Path, *, require_head: bool = True, key: bytes | None = None) -> VerifyResult:
    """`verify` plus, for a run's own `audit.jsonl`, the anchors of that run (in the log's folder)."""
    path = Path(path)
    result = verify(path, require_head=require_head, key=key)
    if path.name != RUN_AUDIT_FILE:  # e.g. a pool log exported next to a run: that run's anchors are not its
        return result
    return check_anchors(result, find_anchors(path.parent), key=key)
