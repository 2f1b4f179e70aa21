"""Slurm launcher logic without Slurm: submit-time --begin plans, the preemption request honoured by
the checkpointing policy at a step boundary, and the multirun job table."""

from __future__ import annotations

import signal
from datetime import datetime, timedelta, timezone

import pytest
import torch
from omegaconf import OmegaConf

from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy
from greenstack.launch import jobs as jobtable
from greenstack.launch import preemption
from greenstack.launch.submit import plan_begin
from greenstack.policies.checkpointing.hierarchical import HierarchicalCheckpointing, Preempted
from greenstack.scheduling.slurm import PLANNED_SAVING_ENV, PLANNED_START_ENV
from tests.helpers.hooks import fire

# the policy checks its deadline against the real clock: plan around the real "now"
NOW = datetime.now(timezone.utc).replace(second=0, microsecond=0)


def _trace(tmp_path, clean_hours):
    start = NOW.replace(minute=0) - timedelta(hours=48)
    rows = ["timestamp,carbon_intensity"]
    for h in range(120):
        t = start + timedelta(hours=h)
        offset = int((t - NOW.replace(minute=0)).total_seconds() // 3600)
        rows.append(f"{t:%Y-%m-%dT%H:%M:%SZ},{100 if offset in clean_hours else 400}")
    path = tmp_path / "trace.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _cfg(trace, **extra):
    return OmegaConf.create({"scheduler": {"_target_": "greenstack.policies.scheduler.forecast_window.ForecastWindow", "duration": "1h",
                                           "deadline": "24h", "trace": str(trace), "carbon": None,
                                           **extra}})


def test_forecast_window_job_is_planned_with_a_begin(tmp_path):
    plan = plan_begin(_cfg(_trace(tmp_path, {5})), now=NOW)
    assert plan is not None and plan.start == NOW.replace(minute=0) + timedelta(hours=5)
    assert plan.begin == f"now+{int((plan.start - NOW).total_seconds())}"
    assert plan.expected_saving_pct == pytest.approx(75.0)
    params = plan.sbatch_parameters()
    assert params["begin"] == plan.begin
    assert params["export"] == f"ALL,{PLANNED_START_ENV}={plan.start:%Y-%m-%dT%H:%M:%SZ},{PLANNED_SAVING_ENV}=75.000"
    assert "expected saving 75.0 %" in plan.describe()


def test_no_begin_when_now_is_best_or_start_requested_or_not_forecast_window(tmp_path):
    now_best = plan_begin(_cfg(_trace(tmp_path, {0, 1})), now=NOW)
    assert now_best is not None and now_best.begin is None and now_best.sbatch_parameters() == {}
    asked = plan_begin(_cfg(_trace(tmp_path, {5}), start_now=True), now=NOW)
    assert asked is not None and asked.begin is None and "start requested" in asked.note
    assert plan_begin(_cfg(_trace(tmp_path, {5}), slurm="sleep"), now=NOW) is None
    assert plan_begin(OmegaConf.create({"scheduler": {"_target_": "greenstack.policies.scheduler.immediate.Immediate"}})) is None


class _RequestAt(Policy):
    """Stands in for the launcher's signal handler: a preemption request in the middle of a step."""

    events = frozenset({Event.AFTER_FORWARD})

    def __init__(self, step: int) -> None:
        super().__init__(name="request")
        self.step = step

    def __call__(self, event, state, reporter):
        if state.step == self.step:
            assert state.preemption.honoured
            state.preemption.request(signal.SIGUSR2)


def _trainer(policies, steps=10):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(7))
    data = torch.utils.data.DataLoader([(x[i], (x[i, 0] > 0).long()) for i in range(64)], batch_size=8,
                                       collate_fn=lambda b: {"inputs": torch.stack([t[0] for t in b]),
                                                             "labels": torch.stack([t[1] for t in b])})
    return Trainer(model, data, Optim(lr=0.05), TrainerConfig(max_duration=f"{steps}ba", progress=False),
                   policies=policies, batch_size=8)


def test_a_launcher_request_is_honoured_at_the_next_step_boundary(tmp_path):
    ckpt = HierarchicalCheckpointing(memory_every=1, local_every=100, local_dir=str(tmp_path / "ckpt"))
    trainer = _trainer([_RequestAt(3), ckpt])
    with pytest.raises(Preempted) as err:
        trainer.fit()
    assert err.value.exit_code == 128 + signal.SIGUSR2
    saved = trainer.state.preemption.saved
    # requested during step 4's forward (state.step is 3 until the step ends): saved after step 4
    assert saved is not None and saved["signal"] == "SIGUSR2" and saved["step"] == 4
    assert (tmp_path / "ckpt" / "step-000000004").is_dir()
    assert not trainer.state.preemption.honoured  # the policy is done


def test_job_table_names_failed_jobs_and_their_logs(capsys, tmp_path):
    metric, kg = jobtable.figures_from_summary({"metrics": {"val/accuracy": {"value": 0.5},
                                                            "test/accuracy": {"value": 0.75},
                                                            "carbon/total_kg_co2e": {"value": 2e-5}}})
    assert metric == ("test/accuracy", 0.75) and kg == 2e-5
    with jobtable.collecting() as table:
        jobtable.record(jobtable.JobOutcome(1, ["lr=0.1"], "FAILED", log_path=str(tmp_path / "1.err"),
                                            error="Traceback ...\nValueError: boom"))
        jobtable.record(jobtable.JobOutcome(0, ["lr=0.01"], "COMPLETED", metric=metric, emissions_kg=kg))
    items = table.outcomes()
    assert [o.num for o in items] == [0, 1] and [o.failed for o in items] == [False, True]
    jobtable.print_table(items)
    out, err = capsys.readouterr()
    assert "2 jobs, 1 failed" in out and "test/accuracy=0.75" in out and "2e-05" in out
    assert f"job 1 FAILED: ValueError: boom; see its log: {tmp_path / '1.err'}" in err
    with jobtable.collecting() as later:  # the next sweep's table starts empty
        pass
    assert later.outcomes() == []


def test_a_job_released_at_its_planned_begin_starts_at_once(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from greenstack.policies.scheduler.forecast_window import ForecastWindow

    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv(PLANNED_START_ENV, "2026-03-02T14:00:00Z")
    monkeypatch.setenv(PLANNED_SAVING_ENV, "75.000")
    slept: list[float] = []
    policy = ForecastWindow(duration="1h", deadline="24h", trace=str(_trace(tmp_path, {5})), sleep=slept.append)
    state = SimpleNamespace(metrics={}, run_dir=str(tmp_path), region=None)
    fire(policy, Event.INIT, state)
    assert slept == [] and policy.plan is None  # no second plan, no waiting inside the allocation
    (decision,) = policy.decisions
    assert decision["action"] == "start" and decision["expected_saving_pct"] == 75.0
    assert decision["choice"]["slurm_job_id"] == "42" and "planned when it was submitted" in decision["notes"][0]


def test_a_run_that_fails_leaves_no_preemption_hooks_behind(tmp_path):
    """A multirun's next job in the same process must not inherit the failed job's policy or group hooks."""
    import greenstack.runner as runner
    from greenstack.compose import compose_with_problems
    from greenstack.errors import GreenstackError
    from tests.conftest import FAST

    channel = preemption.Preemption()
    channel.coordinate(lambda local: None)  # as a federated policy's INIT would have left them
    channel.gate_snapshots(lambda state: False)
    cfg, problems = compose_with_problems(["recipe=quickstart", *FAST, "model.name=resnet10t",
                                           "checkpointing=hierarchical", "checkpointing.resume=required"])
    assert not problems, problems
    # as the Slurm launcher offers its job's channel
    with pytest.raises(GreenstackError, match="resume=required"), preemption.offered(channel):
        runner.run(cfg, tmp_path)  # fails in the checkpointing policy's INIT: no checkpoint to resume
    assert not channel.honoured
    assert channel.agreed(None) is None and channel.snapshot_allowed(object())
