from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from greenstack.checkpoint.codec import CheckpointError, decode, encode
from greenstack.checkpoint.crypto import LocalKey
from greenstack.checkpoint.snapshot import apply_snapshot, capture
from greenstack.checkpoint.store import Store
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.errors import ConfigError
from greenstack.policies.checkpointing.hierarchical import HierarchicalCheckpointing


def _state(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(32, 4)
    batches = [{"inputs": x[i:i + 8], "labels": (x[i:i + 8, 0] > 0).long()} for i in range(0, 32, 8)]
    trainer = Trainer(model, batches, Optim(lr=0.1), TrainerConfig(max_duration="2ep", progress=False), batch_size=8)
    trainer.fit()
    return trainer.state


def test_roundtrip_restores_weights_optimizer_and_rng():
    state = _state()
    torch.manual_seed(123)
    snap = capture(state)
    expected_next = torch.rand(3)
    files = encode(snap)
    other = _state(seed=1)
    apply_snapshot(decode(files), other)
    for k, v in state.model.state_dict().items():
        assert torch.equal(v, other.model.state_dict()[k])
    assert other.optimizer.state_dict()["state"][0]["exp_avg"].equal(state.optimizer.state_dict()["state"][0]["exp_avg"])
    assert torch.equal(torch.rand(3), expected_next)  # RNG restored to the capture point
    assert other.step == state.step and other.resume["batch_in_epoch"] == state.batch_in_epoch


def test_a_kept_snapshot_survives_training_after_it_was_applied():
    """The memory tier keeps snapshots: applying one must not hand its tensors to the optimizer."""
    state = _state()
    snap = capture(state)
    before = {k: v.clone() for k, v in snap.trainer["optimizer"]["state"][0].items()}
    other = _state(seed=1)
    apply_snapshot(snap, other)
    loss = other.model(torch.randn(8, 4, device=other.device)).sum()  # the device the loop put it on
    loss.backward()
    other.optimizer.step()  # Adam updates its state in place
    assert other.optimizer.state_dict()["state"][0]["step"] != before["step"]
    assert all(torch.equal(v, before[k]) for k, v in snap.trainer["optimizer"]["state"][0].items())


def test_flipped_byte_is_refused_plain_and_encrypted():
    key = LocalKey(os.urandom(32), "test")
    for k in (None, key):
        files = encode(capture(_state()), k)
        data = bytearray(files["model.safetensors"])
        data[len(data) // 2] ^= 0x01
        files["model.safetensors"] = bytes(data)
        with pytest.raises(CheckpointError, match="sha256 mismatch"):
            decode(files, k)
    # a flipped byte with a consistent manifest (an attacker rewriting the hash) still fails GCM
    files = encode(capture(_state()), key)
    import hashlib
    import json

    data = bytearray(files["trainer.pt"])
    data[10] ^= 0xFF
    files["trainer.pt"] = bytes(data)
    manifest = json.loads(files["manifest.json"])
    manifest["files"]["trainer.pt"]["sha256"] = hashlib.sha256(files["trainer.pt"]).hexdigest()
    files["manifest.json"] = json.dumps(manifest).encode()
    with pytest.raises(CheckpointError, match="modified or the key is wrong"):
        decode(files, key)


def test_encrypted_checkpoint_needs_the_right_key():
    files = encode(capture(_state()), LocalKey(os.urandom(32), "a"))
    assert b"exp_avg" not in files["trainer.pt"]  # optimizer payload is not readable at rest
    with pytest.raises(CheckpointError, match="wrong master key"):
        decode(files, LocalKey(os.urandom(32), "b"))
    with pytest.raises(CheckpointError, match="encrypted"):
        decode(files, None)


def test_key_from_env_and_clear_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("GS_TEST_KEY", base64.b64encode(os.urandom(32)).decode())
    assert LocalKey.from_config("GS_TEST_KEY").key_id == "env:GS_TEST_KEY"
    monkeypatch.delenv("GS_TEST_KEY")
    with pytest.raises(ConfigError, match="not set"):
        LocalKey.from_config("GS_TEST_KEY")
    (tmp_path / "k").write_bytes(b"short")
    with pytest.raises(ConfigError):
        LocalKey.from_config(key_file=str(tmp_path / "k"))


def test_store_picks_newest_valid_and_skips_corrupt_and_partial(tmp_path):
    store = Store(str(tmp_path))
    a, b = _state(), _state(seed=2)
    a.step, b.step = 5, 9
    store.write("step-000000005", encode(capture(a)))
    files = encode(capture(b))
    files["model.safetensors"] = files["model.safetensors"][:-10]  # truncated
    store.write("step-000000009", files)
    (tmp_path / ".tmp-step-000000011-dead").mkdir()  # a write killed before its rename
    snapshot, name, skipped = store.load_latest()
    assert name == "step-000000005" and snapshot.step == 5
    assert len(skipped) == 1 and "step-000000009" in skipped[0] and "sha256" in skipped[0]
    assert store.clean_partial() == [".tmp-step-000000011-dead"]


def test_object_store_checkpoint_without_manifest_does_not_exist():
    store = Store("memory://ckpt-test")
    files = encode(capture(_state()))
    for name, data in files.items():
        if name != "manifest.json":
            store.fs.pipe_file(f"{store.root_path}/step-000000003/{name}", data)
    snapshot, _, skipped = store.load_latest()
    assert snapshot is None and "no manifest" in skipped[0]
    store.write("step-000000002", files)
    assert store.load_latest()[1] == "step-000000002"


@pytest.mark.parametrize("url", ["local", "memory://ckpt-delete"])
def test_removing_or_replacing_a_checkpoint_never_exposes_a_partial_one(tmp_path, monkeypatch, url):
    """A kill at any instant of pruning or overwriting must not leave a published checkpoint with missing
    files (the chaos run once found `step-000000004: missing file model.safetensors` after SIGKILL during
    pruning). Every file removal is intercepted: at that instant every published checkpoint must decode."""
    store = Store(str(tmp_path) if url == "local" else url)
    files = encode(capture(_state()))
    for name in ("step-000000002", "step-000000004"):
        store.write(name, files)
    seen: list[list[str]] = []

    def check_published() -> None:
        fresh = Store(store.url)
        if not fresh.local:
            fresh.fs = store.fs
            fresh.root_path = store.root_path
        for name in fresh.names():
            files = fresh.read(name)
            if fresh.local or "manifest.json" in files:  # remote: no manifest = not published
                decode(files)  # raises CheckpointError if a published one lost a file
        seen.append(fresh.names())

    if store.local:
        real_unlink = os.unlink

        def unlink(path, *a, **k):  # what shutil.rmtree calls for each file
            result = real_unlink(path, *a, **k)
            check_published()
            return result

        monkeypatch.setattr(os, "unlink", unlink)
    else:
        real_rm_file, real_rm = store.fs.rm_file, store.fs.rm

        def rm_file(path, *a, **k):
            result = real_rm_file(path, *a, **k)
            check_published()
            return result

        def rm(path, *a, **k):
            check_published()
            return real_rm(path, *a, **k)

        monkeypatch.setattr(store.fs, "rm_file", rm_file)
        monkeypatch.setattr(store.fs, "rm", rm)
    store.delete("step-000000002")
    if store.local:
        store.write("step-000000004", files)  # overwrite in place (an emergency save of the same step)
    assert seen, "no removal was intercepted"
    assert store.names() == ["step-000000004"]
    assert store.load_latest()[1] == "step-000000004"
    if store.local:
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_kill_9_during_a_write_never_leaves_a_loadable_checkpoint(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(os.getcwd())!r})
        from greenstack.checkpoint.store import Store
        files = {{"model.safetensors": os.urandom(64 << 20), "trainer.pt": b"x", "manifest.json": b"{{}}"}}
        print("ready", flush=True)
        Store({str(tmp_path)!r}).write("step-000000042", files)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.time() + 30
    while time.time() < deadline and not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir()):
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(str(tmp_path))
    assert store.names() in ([], ["step-000000042"])  # killed before or (rarely) after the atomic rename
    if store.names():
        with pytest.raises(CheckpointError):
            decode(store.read("step-000000042"))
    assert store.load_latest()[0] is None


def test_policy_validates_all_arguments():
    with pytest.raises(ConfigError) as err:
        HierarchicalCheckpointing(memory_keep=0, resume="sometimes", signals=["SIGFOO"], preempt_budget_s=0)
    keys = {p.key for p in err.value.problems}
    assert keys == {"checkpointing.memory_keep", "checkpointing.resume", "checkpointing.signals",
                    "checkpointing.preempt_budget_s"}


def test_spot_notice_triggers_a_checkpoint_and_a_clean_stop(tmp_path):
    import http.server
    import json
    import threading

    from greenstack.policies.checkpointing.hierarchical import Preempted

    calls = {"n": 0}

    class FakeImds(http.server.BaseHTTPRequestHandler):
        def do_PUT(self):  # IMDSv2 token
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"token-123")

        def do_GET(self):
            calls["n"] += 1
            assert self.headers["X-aws-ec2-metadata-token"] == "token-123"
            if calls["n"] < 3:
                self.send_response(404)
                self.end_headers()
                return
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps({"action": "terminate", "time": "2026-11-29T15:00:00Z"}).encode())

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeImds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        class Slow(torch.nn.Linear):
            def forward(self, x):
                time.sleep(0.01)
                return super().forward(x)

        x = torch.randn(8, 4)
        batches = [{"inputs": x, "labels": (x[:, 0] > 0).long()}] * 200
        policy = HierarchicalCheckpointing(memory_every=0, local_every=50, local_dir=str(tmp_path), signals=[],
                                           spot_notice=True, spot_endpoint=f"http://127.0.0.1:{server.server_port}",
                                           spot_interval_s=0.05)
        trainer = Trainer(Slow(4, 2), batches, Optim(lr=0.1), TrainerConfig(max_duration="200ba", progress=False),
                          policies=[policy], batch_size=8)
        with pytest.raises(Preempted, match="spot terminate at 2026-11-29T15:00:00Z") as err:
            trainer.fit()
        assert err.value.exit_code == 128 + signal.SIGTERM
        stopped_at = trainer.state.step
        assert 0 < stopped_at < 200
        assert Store(str(tmp_path)).names()[0] == f"step-{stopped_at:09d}"
    finally:
        server.shutdown()


def test_each_rank_of_a_multi_process_run_keeps_its_own_checkpoints(tmp_path):
    from greenstack.engine.state import State

    policy = HierarchicalCheckpointing(durable_url=f"file://{tmp_path}/durable/")
    single = policy._stores(State(model=torch.nn.Linear(1, 1), run_dir=str(tmp_path)))
    rank2 = policy._stores(State(model=torch.nn.Linear(1, 1), run_dir=str(tmp_path), rank=2, world_size=4))
    assert str(single["local"]).rstrip("/").endswith("checkpoints")
    assert str(rank2["local"]).rstrip("/").endswith("checkpoints/rank-2")
    assert str(rank2["durable"]).rstrip("/").endswith("durable/rank-2")


class _Evil:
    """A pickle that would run code on load (weights_only refuses it)."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _rehash(files: dict) -> dict:
    """Make the manifest's sha256 entries match the (malformed) files again, as an attacker could."""
    import hashlib
    import json

    manifest = json.loads(files["manifest.json"])
    if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
        for name, entry in manifest["files"].items():
            if isinstance(entry, dict) and name in files:
                entry["sha256"] = hashlib.sha256(files[name]).hexdigest()
                entry["bytes"] = len(files[name])
        files["manifest.json"] = json.dumps(manifest).encode()
    return files


def _corrupt_manifest(files, change):
    import json

    manifest = json.loads(files["manifest.json"])
    files["manifest.json"] = json.dumps(change(manifest)).encode()
    return files


def _torch_bytes(obj) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _safetensors_header(data: bytes) -> bytes:
    return (10**12).to_bytes(8, "little") + data[8:]  # header length far beyond the file


MALFORMED = {
    "manifest entry missing": (lambda f: _corrupt_manifest(f, lambda m: {**m, "files": {
        k: v for k, v in m["files"].items() if k != "trainer.pt"}}), "no entry for trainer.pt"),
    "manifest is []": (lambda f: {**f, "manifest.json": b"[]"}, "not a JSON object"),
    "manifest files not a table": (lambda f: _corrupt_manifest(f, lambda m: {**m, "files": []}), "'files'"),
    "manifest entry without sha256": (lambda f: _corrupt_manifest(f, lambda m: {**m, "files": {
        **m["files"], "state.json": "x"}}), "no sha256"),
    "safetensors header corrupted": (lambda f: _rehash({**f, "model.safetensors": _safetensors_header(
        f["model.safetensors"])}), "model.safetensors is unreadable"),
    "safetensors not safetensors": (lambda f: _rehash({**f, "model.safetensors": b"\x00" * 4}),
                                    "model.safetensors is unreadable"),
    "state.json missing keys": (lambda f: _rehash({**f, "state.json": b'{"step": 9}'}), "state.json lacks epoch"),
    "state.json not JSON": (lambda f: _rehash({**f, "state.json": b"\xff{"}), "state.json is not valid JSON"),
    "state.json rng malformed": (lambda f: _rehash({**f, "state.json": (
        b'{"step": 9, "epoch": 0, "batch_in_epoch": 0, "samples_seen": 0, "rng": 1, "created_at": ""}')}),
        "rng entry is malformed"),
    "malicious pickle": (lambda f: _rehash({**f, "trainer.pt": _torch_bytes(_Evil())}),
                         "trainer.pt cannot be loaded safely"),
    "trainer.pt truncated": (lambda f: _rehash({**f, "trainer.pt": f["trainer.pt"][:50]}),
                             "trainer.pt cannot be loaded safely"),
    "trainer.pt without state": (lambda f: _rehash({**f, "trainer.pt": _torch_bytes({"optimizer": None})}),
                                 "lacks the optimizer"),
}


@pytest.mark.parametrize("corruption", sorted(MALFORMED))
def test_malformed_checkpoint_with_matching_hashes_falls_back_to_an_older_one(tmp_path, corruption, capfd):
    """Content that passes the sha256 check but is malformed is skipped with its reason, never a crash."""
    corrupt, reason = MALFORMED[corruption]
    store = Store(str(tmp_path))
    good = _state()
    good.step = 5
    store.write("step-000000005", encode(capture(good)))
    newer = _state(seed=2)
    newer.step = 9
    store.write("step-000000009", corrupt(encode(capture(newer))))
    snapshot, name, skipped = store.load_latest()
    assert name == "step-000000005" and snapshot.step == 5
    assert len(skipped) == 1 and "step-000000009" in skipped[0] and reason in skipped[0], skipped
    assert "pwned" not in capfd.readouterr().out  # the pickle's payload never ran


def test_checkpoint_manifests_anchor_the_audit_head_so_a_cut_log_shows(tmp_path):
    """issue 22.1: each manifest holds the run's audit head at save time; `verify_run` checks the log against it."""
    import json

    from greenstack.ledger.audit import AuditLog, canonical, head_path, verify, verify_run

    log = AuditLog(tmp_path / "audit.jsonl", actor="run t")
    for i in range(3):
        log.append("schedule", {"i": i})
    x = torch.randn(8, 4)
    batches = [{"inputs": x, "labels": (x[:, 0] > 0).long()}] * 4
    policy = HierarchicalCheckpointing(memory_every=0, local_every=2, local_dir=str(tmp_path / "checkpoints"),
                                       signals=[])
    Trainer(torch.nn.Linear(4, 2), batches, Optim(lr=0.1), TrainerConfig(max_duration="4ba", progress=False),
            policies=[policy], batch_size=8, run_dir=str(tmp_path)).fit()
    manifests = sorted((tmp_path / "checkpoints").glob("*/manifest.json"))
    assert manifests
    anchor = json.loads(manifests[-1].read_text())["audit_head"]
    assert anchor["seq"] == 3 and anchor["hash"] == log.records()[-1]["hash"]
    assert verify_run(log.path).ok
    lines = log.path.read_text().splitlines()[:1]  # cut two lines, rewrite a consistent head
    log.path.write_text(lines[0] + "\n")
    head_path(log.path).write_text(canonical({"seq": 1, "hash": json.loads(lines[0])["hash"]}) + "\n")
    assert verify(log.path).ok
    result = verify_run(log.path)
    assert not result.ok and "manifest.json anchors 3 lines, the log has 1" in result.problems[0].reason
