"""Preemption: SIGTERM at a random step, resume, and end bit-identical to an uninterrupted run
(with trainer.deterministic=true, which also makes it hold on CUDA; benchmarks/gpu_check.sh runs it there)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.conftest import _env

RUN = ["data=synthetic_image", "data.num_samples=160", "data.batch_size=16", "data.image_size=32",
       "model.name=resnet18", "trainer.max_duration=3ep", "trainer.log_interval=1", "trainer.progress=false",
       "tracker=wandb", "checkpointing=hierarchical", "checkpointing.memory_every=1",
       "checkpointing.local_every=2", "energy.interval_s=0.2", "trainer.deterministic=true"]


def _cmd(run_dir, *extra):
    return [sys.executable, "-m", "greenstack", "train", *RUN, f"hydra.run.dir={run_dir}", *extra]


def _steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def _weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


@pytest.mark.slow
def test_sigterm_at_random_steps_then_resume_is_bit_identical(tmp_path):
    reference = tmp_path / "reference"
    done = subprocess.run(_cmd(reference), env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = _weights(reference)
    total = json.loads((reference / "sustainability.json").read_text())["metrics"]["train/steps"]["value"]
    rng = random.Random(1234)
    for trial, stop_at in enumerate(sorted(rng.sample(range(2, total // 2), 2))):
        run_dir = tmp_path / f"preempted{trial}"
        proc = subprocess.Popen(_cmd(run_dir), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while _steps(run_dir) < stop_at and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert proc.poll() is None, "the run finished before it could be interrupted"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
        assert "preempted by SIGTERM" in out + err and "checkpointing.resume=auto" in out + err
        assert not (run_dir / "model.safetensors").exists()
        resumed = subprocess.run(_cmd(run_dir, "checkpointing.resume=auto"), env=_env(), capture_output=True,
                                 text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        summary = json.loads((run_dir / "sustainability.json").read_text())
        assert "checkpoint/resumed_from" in summary["metrics"]
        assert summary["metrics"]["trainer/deterministic"]["value"] == 1  # the run records how it ran
        got = _weights(run_dir)
        assert got.keys() == expected.keys()
        assert all((got[k] == expected[k]).all() for k in expected), f"weights differ after resume at {stop_at}"
        # the same run id (and so the same W&B run) continues
        assert summary["run_id"] == (run_dir / ".greenstack" / "run_id").read_text().strip()
        assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
        ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
        assert ids == {summary["run_id"]}


def test_tampered_checkpoint_is_refused_on_resume(tmp_path):
    run_dir = tmp_path / "run"
    first = subprocess.run(_cmd(run_dir, "trainer.max_duration=4ba", "checkpointing.encryption=true",
                                "tracker=none"),
                           env=_env({"GREENSTACK_CHECKPOINT_KEY": "A" * 43 + "="}), capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    ckpts = sorted((run_dir / "checkpoints").iterdir())
    assert ckpts
    # every snapshot is in the run's hash-chained audit log, with its stall time
    records = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    snapshots = [r for r in records if r["kind"] == "checkpoint" and r["data"]["action"] == "snapshot"]
    assert [r["data"]["step"] for r in snapshots] == [1, 2, 3, 4]
    assert all(r["data"]["stall_ms"] >= 0 for r in snapshots)
    for ckpt in ckpts:
        weights = ckpt / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[100] ^= 0x01
        weights.write_bytes(bytes(data))
    again = subprocess.run(_cmd(run_dir, "trainer.max_duration=8ba", "checkpointing.encryption=true",
                                "checkpointing.resume=auto", "tracker=none"),
                           env=_env({"GREENSTACK_CHECKPOINT_KEY": "A" * 43 + "="}), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 3
    assert "none is valid" in again.stdout + again.stderr and "sha256 mismatch" in again.stdout + again.stderr
    assert "Traceback" not in again.stderr
