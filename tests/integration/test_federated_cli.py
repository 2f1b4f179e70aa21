"""`greenstack train federated=geo` as a user runs it: spawned workers, one set of outputs, clean failures."""

from __future__ import annotations

import csv
import json
import time

import pytest

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy
from tests.conftest import FAST, REPO, read_jsonl
from tests.helpers.wandb_reader import find_run_files, read_run

TINY = ["federated=geo", "data=synthetic_image", "model.name=test_resnet", "data.num_samples=128",
        "data.batch_size=8", "federated.local_steps=2", "trainer.max_duration=8ba"]
PYTHONPATH = {"PYTHONPATH": f"{REPO}:{REPO / 'tests' / 'integration'}"}


class CrashOnRank(Policy):
    """Fails one worker mid-run, as a bug or a dead node would."""

    events = frozenset({Event.STEP_END})

    def __init__(self, rank: int = 1, at_step: int = 2) -> None:
        super().__init__(name="crash")
        self.rank, self.at_step = rank, at_step

    def __call__(self, event, state, reporter) -> None:
        if state.rank == self.rank and state.step >= self.at_step:
            raise RuntimeError(f"injected failure on rank {state.rank}")


class PreemptOnRank(Policy):
    """Delivers a preemption request to one worker only, as a signal reaching one process would."""

    events = frozenset({Event.STEP_END})

    def __init__(self, rank: int = 1, at_step: int = 3) -> None:
        super().__init__(name="preempt")
        self.rank, self.at_step = rank, at_step

    def __call__(self, event, state, reporter) -> None:
        import signal

        if state.rank == self.rank and state.step == self.at_step:
            state.preemption.request(signal.SIGUSR1)


@pytest.mark.slow
def test_geo_train_spawns_workers_and_writes_one_summary_with_per_region_figures(cli, tmp_path):
    run_dir = tmp_path / "run"
    fast = [o for o in FAST if not o.startswith("tracker")]
    result = cli("train", *fast, *TINY, "tracker=wandb", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    summary = json.loads((run_dir / "sustainability.json").read_text())
    figures = summary["metrics"]
    assert figures["federated/workers"]["value"] == 4 and figures["federated/rounds"]["value"] == 4
    assert figures["federated/bytes_sent"]["value"] > 0 and figures["federated/bytes_sent"]["unit"] == "B"
    for region, zone in (("eu-north", "GB"), ("us-west", "US-CAL-CISO"), ("eu-central", "DE-LU")):
        energy = figures[f"federated/region/{region}/energy_kwh"]
        emissions = figures[f"federated/region/{region}/emissions_kg"]
        assert energy["value"] >= 0 and energy["unit"] == "kWh" and "per worker process" in energy["source"]
        assert energy["provenance"] in ("estimated", "fallback")  # a TDP model, never "measured"
        assert emissions["value"] >= 0 and f"electricitymaps:{zone}" in emissions["source"]
        assert summary["federated"]["regions"][region]["workers"] == {"eu-north": 2}.get(region, 1)
    steps = sum(summary["federated"]["regions"][r]["steps"] for r in summary["federated"]["regions"])
    assert 8 <= steps <= 4 * 8  # the cleanest region always works; others may sit out
    assert len(summary["federated"]["per_round"]) == 4
    assert all(r["bytes_sent"] > 0 for r in summary["federated"]["per_round"])
    assert figures["federated/emissions_kg"]["value"] == pytest.approx(
        sum(figures[f"federated/region/{r}/emissions_kg"]["value"] for r in ("eu-north", "us-west", "eu-central")))
    # rank 0 alone writes: one W&B run, one emissions row, decisions once per round in the audit log
    assert len(find_run_files(run_dir)) == 1
    run = read_run(find_run_files(run_dir)[0])
    assert run["run_id"] == summary["run_id"]
    assert run["summary"]["federated/bytes_sent"] == figures["federated/bytes_sent"]["value"]
    assert len(list(csv.DictReader((run_dir / "emissions.csv").open()))) == 1
    audit = read_jsonl(run_dir / "audit.jsonl")
    rounds = [r["data"]["round"] for r in audit if r["data"].get("policy") == "geo"]
    assert rounds == [0, 1, 2, 3]
    assert all("test/accuracy" not in r or r["test/accuracy"] is not None for r in read_jsonl(run_dir / "metrics.jsonl"))


@pytest.mark.slow
def test_a_crashing_worker_fails_the_run_with_its_rank_and_cause_without_hanging(cli, tmp_path):
    run_dir = tmp_path / "run"
    t0 = time.monotonic()
    result = cli("train", *FAST, *TINY, f"hydra.run.dir={run_dir}", "federated.timeout_s=60",
                 "federated.participation.mode=uniform",
                 "+policies.crash._target_=test_federated_cli.CrashOnRank", "+policies.crash.rank=1",
                 env=PYTHONPATH, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode != 0, out[-3000:]
    assert "rank 1" in out and "injected failure on rank 1" in out, out[-3000:]
    assert time.monotonic() - t0 < 240
    written = run_dir / "sustainability.json"
    if written.exists():  # what the coordinator measured before the failure, flagged as partial
        summary = json.loads(written.read_text())
        assert summary["partial"] is True and summary["status"] in ("failed", "interrupted"), summary.get("status")


def test_bad_geo_input_is_rejected_before_any_process_starts(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("train", *FAST, *TINY, f"hydra.run.dir={run_dir}", "federated.compression.ratio=0",
                 "~federated.regions.us-west.carbon", "federated.regions.eu-north.capacity=0",
                 "federated.regions.us-west.capacity=0", "federated.regions.eu-central.capacity=0")
    out = result.stdout + result.stderr
    assert result.returncode == 2, out[-3000:]
    for text in ("federated.compression.ratio", "(0, 1]", "no carbon source", "total capacity is zero"):
        assert text in out, text
    assert "Traceback" not in out and "spawning" not in out
    assert not run_dir.exists()


@pytest.mark.slow
def test_geo_runs_unchanged_under_an_external_torchrun_launch(tmp_path):
    import subprocess
    import sys

    from greenstack.federated.launch import free_port
    from tests.conftest import _env

    run_dir = tmp_path / "run"
    overrides = [*FAST, *TINY, "~federated.regions.us-west", "~federated.regions.eu-central",
                 f"hydra.run.dir={run_dir}"]  # one region, 2 workers: the launch's WORLD_SIZE must be 2
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--rdzv-backend=c10d",
           f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "greenstack", "train", *overrides]
    result = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "spawning" not in out  # joined torchrun's group instead of starting workers
    figures = json.loads((run_dir / "sustainability.json").read_text())["metrics"]
    assert figures["federated/workers"]["value"] == 2 and figures["federated/region/eu-north/steps"]["value"] == 16


@pytest.mark.slow
def test_a_preempted_worker_stops_every_worker_at_one_step_and_the_run_resumes(cli, tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *FAST, "federated=ddp", "federated.workers=2", "federated.exact_resume=true",
            "data=synthetic_image", "model.name=test_resnet", "data.num_samples=128", "data.batch_size=8",
            "trainer.max_duration=8ba", "checkpointing=hierarchical", "checkpointing.local_every=100",
            f"hydra.run.dir={run_dir}", "+policies.preempt._target_=test_federated_cli.PreemptOnRank"]
    first = cli(*args, env=PYTHONPATH, timeout=300)
    out = first.stdout + first.stderr
    assert first.returncode == 128 + 10, out[-3000:]  # SIGUSR1, as a single preempted process exits
    assert "all 2 workers preempted at step 3" in out and "checkpointing.resume=auto" in out, out[-3000:]
    assert "Traceback" not in out
    for rank in (0, 1):  # each worker saved its own checkpoint at the agreed step
        assert [p.name for p in (run_dir / "checkpoints" / f"rank-{rank}").glob("step-*")] == ["step-000000003"]
    again = cli(*args, "checkpointing.resume=auto", "+policies.preempt.at_step=-1",
                "checkpointing.resume_allow_changes=[policies.preempt.at_step]", env=PYTHONPATH, timeout=300)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    figures = json.loads((run_dir / "sustainability.json").read_text())["metrics"]
    assert figures["train/steps"]["value"] == 8
    assert "rank-0/step-000000003" in figures["checkpoint/resumed_from"]["value"]


@pytest.mark.slow
def test_geo_with_secure_aggregation_over_tls_from_the_command_line(cli, tmp_path):
    keys = tmp_path / "pki"
    made = cli("federated", "keygen", "--regions", "eu-north", "--out", str(keys))
    assert made.returncode == 0 and (keys / "eu-north.key").stat().st_mode & 0o077 == 0
    run_dir = tmp_path / "run"
    result = cli("train", *FAST, *TINY, "~federated.regions.us-west", "~federated.regions.eu-central",
                 "federated.secure_aggregation=true", "federated.transport=tls", f"federated.tls.dir={keys}",
                 f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    figures = json.loads((run_dir / "sustainability.json").read_text())["metrics"]
    assert figures["federated/transport"]["value"] == "tls1.3"
    assert figures["federated/secure_aggregation"]["value"] == 1
    assert figures["federated/workers"]["value"] == 2 and figures["federated/rounds"]["value"] == 4
