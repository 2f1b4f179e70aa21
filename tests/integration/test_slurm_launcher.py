"""`launcher=slurm` on a real single-node Slurm with accounting (tests/infra/slurm.sh, started by .ci/run).

Each test runs `greenstack train -m ... launcher=slurm` as a user would and checks what Slurm and the
run dirs say: results and W&B runs of a 3-job sweep, a carbon-aware `--begin` (reason BeginTime),
USR1 preemption -> checkpoint -> requeue -> the same weights as an uninterrupted job, the same after
Slurm's own time-limit signal (USR2), and a failing job that makes the sweep exit non-zero with the
job table.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import _env, read_jsonl
from tests.helpers.wandb_reader import find_run_files, read_run

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
ENABLED = os.environ.get("GREENSTACK_TEST_SLURM") == "1"
# one CPU per job (2-core CI machine), one thread so results do not depend on the thread count
SMALL = ["data=synthetic_image", "model.name=resnet10t", "data.num_samples=64", "data.batch_size=16",
         "data.image_size=32", "trainer.limit_eval_batches=1", "trainer.progress=false", "trainer.log_interval=1",
         "energy.interval_s=0.2", "launcher=slurm", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.timeout_min=30"]


@pytest.fixture(autouse=True)
def slurm():
    if not ENABLED:
        if os.environ.get("CI"):
            pytest.fail("CI must start Slurm (bash tests/infra/slurm.sh) and set GREENSTACK_TEST_SLURM=1")
        pytest.skip("no Slurm: run `bash tests/infra/slurm.sh` (root) and set GREENSTACK_TEST_SLURM=1")
    assert shutil.which("sbatch") and shutil.which("sacct"), "Slurm client commands missing"


def _greenstack(*args: str) -> list[str]:
    return [sys.executable, "-m", "greenstack", "train", "-m", *args]


def _run(tmp_path: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(_greenstack(*args), cwd=tmp_path, env=_env({"OMP_NUM_THREADS": "1"}),
                          capture_output=True, text=True, timeout=timeout)


def _max_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    try:
        return max((r.get("step", 0) for r in read_jsonl(path)), default=0)
    except ValueError:  # a line caught half-written
        return 0


def test_three_job_sweep_results_and_wandb_runs(tmp_path):
    sweep = tmp_path / "sweep"
    done = _run(tmp_path, "optim.lr=1e-3,3e-3,1e-2", *SMALL, "trainer.max_duration=2ba", "tracker=wandb",
                f"hydra.sweep.dir={sweep}")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "3 jobs, 0 failed" in out
    ids = set()
    for num, lr in enumerate((1e-3, 3e-3, 1e-2)):
        job = sweep / str(num)
        summary = json.loads((job / "sustainability.json").read_text())
        assert summary["metrics"]["train/steps"]["value"] == 2
        assert summary["metrics"]["carbon/total_kg_co2e"]["value"] > 0
        files = find_run_files(job)
        assert len(files) == 1
        run = read_run(files[0])
        assert run["run_id"] == summary["run_id"]
        assert run["config"]["optim"]["lr"] == pytest.approx(lr)
        assert run["summary"]["carbon/total_kg_co2e"] == pytest.approx(summary["metrics"]["carbon/total_kg_co2e"]["value"])
        ids.add(run["run_id"])
    assert len(ids) == 3
    # every job really ran under Slurm: accounting knows three completed array tasks
    array_ids = {job.split("_")[0] for job in _job_ids(sweep)}
    assert len(array_ids) == 1
    assert _settled_states(array_ids.pop(), 3) == ["COMPLETED"] * 3


def _settled_states(job_id: str, count: int, timeout_s: float = 60.0) -> list[str]:
    """Sorted accounting states of a job's array tasks once none is still RUNNING/PENDING/COMPLETING.

    Why wait: slurmdbd records a task's end a moment after the task's output is on disk, so a query
    right after the sweep can still see RUNNING (a CI flake under load).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        rows = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", job_id],
                              capture_output=True, text=True, check=True).stdout.split()
        states = sorted(r.split("|")[1] for r in rows)
        unsettled = any(st in ("RUNNING", "PENDING", "COMPLETING") for st in states)
        if (len(states) == count and not unsettled) or time.monotonic() > deadline:
            return states
        time.sleep(1.0)


def _job_ids(sweep: Path) -> set[str]:
    """Slurm job ids of a sweep's jobs (submitit's folders: `ID` or `ARRAYID_TASK`)."""
    folder = sweep / ".submitit"
    return {p.name for p in folder.iterdir() if p.name[0].isdigit()} if folder.is_dir() else set()


def _trace(path: Path, low_from_h: int) -> Path:
    """An hourly trace: dirty now, clean `low_from_h` hours from now (for 3 hours)."""
    now = datetime.now(timezone.utc).replace(minute=0, second=0, microsecond=0)
    rows = ["timestamp,carbon_intensity"]
    for h in range(-48, 72):
        rows.append(f"{now + timedelta(hours=h):%Y-%m-%dT%H:%M:%SZ},{100 if low_from_h <= h < low_from_h + 3 else 500}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_forecast_window_plans_begin_at_submit_time(tmp_path):
    trace = _trace(tmp_path / "trace.csv", low_from_h=4)
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(_greenstack("seed=0", *SMALL, "trainer.max_duration=2ba", "tracker=none",
                                        "scheduler=forecast_window", f"scheduler.trace={trace}",
                                        "scheduler.duration=1h", "scheduler.deadline=24h",
                                        f"hydra.sweep.dir={sweep}"),
                            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        job_id, reason, deadline = None, "", time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            listing = subprocess.run(["squeue", "-h", "-o", "%i|%r"], capture_output=True, text=True).stdout
            mine = [line.split("|") for line in listing.splitlines() if line.split("|")[0] in _job_ids(sweep)]
            if mine:
                job_id, reason = mine[0]
                break
            time.sleep(0.5)
        assert job_id, "the job never showed up in squeue"
        assert reason == "BeginTime"
        # Slurm's planned start is the clean window, about 4 h from now (controller local time)
        scontrol = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        assert "StartTime=" in scontrol and "Reason=BeginTime" in scontrol
        subprocess.run(["scancel", job_id], check=True)
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = out + err
    assert "carbon-aware plan" in text and "--begin=now+" in text and "expected saving 80.0 %" in text
    begin_s = int(text.split("--begin=now+")[1].split()[0])
    assert 3 * 3600 <= begin_s <= 4 * 3600 + 60
    assert proc.returncode != 0
    assert "1 job, 1 failed" in text and "CANCELLED" in text


def _start(tmp_path: Path, args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(_greenstack(*args), cwd=tmp_path, env=_env({"OMP_NUM_THREADS": "1"}),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_until_running(proc: subprocess.Popen, sweep: Path, max_steps: int) -> str:
    """Slurm job id of sweep job #1 once it has taken 5 of its `max_steps` steps (and is still training)."""
    deadline = time.monotonic() + 240
    while _max_step(sweep / "1") < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None and _max_step(sweep / "1") < max_steps, "the job finished before it could be interrupted"
    return next(job for job in _job_ids(sweep) if job.endswith("_1"))


def test_usr1_checkpoints_requeues_and_matches_an_uninterrupted_job(tmp_path):
    sweep = tmp_path / "sweep"
    args = ["run_name=reference,preempted", *SMALL, "data.num_samples=160", "trainer.max_duration=40ba",
            "tracker=wandb", "checkpointing=hierarchical", "checkpointing.memory_every=1",
            "checkpointing.local_every=2", f"hydra.sweep.dir={sweep}"]
    proc = _start(tmp_path, args)
    victim = sweep / "1"
    try:
        job_id = _wait_until_running(proc, sweep, max_steps=40)
        subprocess.run(["scancel", "--signal=USR1", "--full", job_id], check=True)
        out, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    log, summary = _requeued_like_the_reference(proc.returncode, out + err, sweep, job_id)
    assert "preempted by SIGUSR1" in log and "requeueing job" in log
    # one W&B run, continued: two offline segments with the run id of the run dir
    segments = sorted((victim / "wandb").glob("offline-run-*"))
    assert len(segments) == 2
    assert {p.name.rsplit("-", 1)[-1] for p in segments} == {summary["run_id"]}
    restarts = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-o", "JobID,State", "-j", job_id],
                              capture_output=True, text=True, check=True).stdout
    assert "REQUEUED" in restarts or "PREEMPTED" in restarts, restarts


def _requeued_like_the_reference(returncode: int, text: str, sweep: Path, job_id: str) -> tuple[str, dict]:
    """The 2-job sweep passed and job #1 resumed from its checkpoint with uninterrupted job #0's weights.

    Returns job #1's Slurm log and its sustainability summary for the test's own checks.
    """
    assert returncode == 0, text[-4000:]
    assert "2 jobs, 0 failed" in text
    summary = json.loads((sweep / "1" / "sustainability.json").read_text())
    assert "checkpoint/resumed_from" in summary["metrics"]
    reference, resumed = load_file(str(sweep / "0" / "model.safetensors")), load_file(str(sweep / "1" / "model.safetensors"))
    assert resumed.keys() == reference.keys()
    assert all((resumed[k] == reference[k]).all() for k in reference), "weights differ after the requeue"
    return _job_log(sweep, job_id), summary


def _job_log(sweep: Path, job_id: str) -> str:
    return "\n".join(p.read_text(errors="replace") for p in (sweep / ".submitit").glob(f"{job_id}/*_log.*"))


def test_slurm_time_limit_signal_checkpoints_requeues_and_matches(tmp_path):
    """A real time limit: Slurm itself sends USR2 `signal_delay_s` before it (submitit's --signal).

    The running job's limit is cut to 2 min with scontrol, inside the 120 s warning window, so
    slurmctld signals at its next time-limit check; once the job reports the signal, the limit is
    raised again so the requeued job can finish.
    """
    sweep = tmp_path / "sweep"
    args = ["run_name=reference,limited", *SMALL, "data.num_samples=160", "trainer.max_duration=700ba",
            "tracker=none", "checkpointing=hierarchical", "checkpointing.memory_every=1",
            "checkpointing.local_every=100", "hydra.launcher.signal_delay_s=120", f"hydra.sweep.dir={sweep}"]
    proc = _start(tmp_path, args)
    try:
        job_id = _wait_until_running(proc, sweep, max_steps=700)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=2"], check=True)
        deadline = time.monotonic() + 150
        while "received SIGUSR2" not in _job_log(sweep, job_id) and time.monotonic() < deadline:
            time.sleep(0.1)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=30"], check=True)
        assert "received SIGUSR2" in _job_log(sweep, job_id), "Slurm sent no time-limit signal"
        out, err = proc.communicate(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
    log, summary = _requeued_like_the_reference(proc.returncode, out + err, sweep, job_id)
    assert "checkpoint for SIGUSR2 saved" in log and "requeueing job" in log
    assert summary["metrics"]["train/steps"]["value"] == 700
    restarts = subprocess.run(["sacct", "-n", "-X", "-P", "-D", "-o", "JobID,State", "-j", job_id],
                              capture_output=True, text=True, check=True).stdout
    assert "REQUEUED" in restarts, restarts


def test_failing_job_fails_the_sweep_with_a_table(tmp_path):
    sweep = tmp_path / "sweep"
    done = _run(tmp_path, "checkpointing=hierarchical", "checkpointing.resume=never,required", *SMALL,
                "trainer.max_duration=2ba", "tracker=none", f"hydra.sweep.dir={sweep}")
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert "2 jobs, 1 failed" in out and "COMPLETED" in out and "FAILED" in out
    assert "Traceback" not in done.stderr.split("greenstack sweep")[-1]
    pointer = next(line for line in done.stderr.splitlines() if line.startswith("job 1 FAILED"))
    log_file = Path(pointer.rsplit("see its log: ", 1)[1].strip())
    assert "resume=required but no checkpoint was found" in log_file.read_text()
    assert (sweep / "0" / "model.safetensors").is_file()  # the good job still finished
