"""pause_resume pauses and resumes a real (tiny) training run, driven by a synthetic trace and a fake clock."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pandas as pd
import pytest
import torch

from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy
from greenstack.engine.reporter import Reporter
from greenstack.engine.requests import PauseRequest
from greenstack.errors import ConfigError
from greenstack.policies.scheduler.pause_resume import PauseResume

STEP_S = 20 * 60  # each training step takes 20 (fake) minutes: 12 steps = 4 h of work
DIRTY = (2, 3, 4)  # 02:00-05:00 UTC on the first day at 500 g/kWh, everything else 100


class FakeClock:
    def __init__(self, start: str) -> None:
        self.t = datetime.fromisoformat(start).timestamp()
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.t += seconds

    def hour(self) -> float:
        return (self.t - datetime(2023, 1, 1, tzinfo=timezone.utc).timestamp()) / 3600


class SlowSteps(Policy):
    """Advances the fake clock at every step end, as if each optimizer step took STEP_S."""

    events = frozenset({Event.STEP_END})

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(name="slow_steps")
        self.clock = clock
        self.step_hours: list[float] = []

    def __call__(self, event: Event, state, reporter: Reporter) -> None:
        self.clock.t += STEP_S
        self.step_hours.append(self.clock.hour())


@pytest.fixture
def trace(tmp_path):
    times = pd.date_range("2023-01-01", periods=48, freq="h", tz="UTC")
    dirty = (times.day == 1) & times.hour.isin(DIRTY)
    path = tmp_path / "trace.csv"
    pd.DataFrame({"timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "carbon_intensity": np.where(dirty, 500.0, 100.0)}).to_csv(path, index=False)
    return str(path)


def toy_batches(n: int = 96, batch: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    return [{"inputs": x[i:i + batch], "labels": y[i:i + batch]} for i in range(0, n, batch)]


def train(tmp_path, *policies) -> tuple[Trainer, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    trainer = Trainer(model, toy_batches(), Optim(lr=0.05), TrainerConfig(max_duration="1ep", progress=False),
                      policies=list(policies), batch_size=8, run_dir=str(tmp_path))
    trainer.fit()
    return trainer, model


def pause_resume(clock: FakeClock, trace: str, **kw) -> PauseResume:
    kw = {"threshold_g_per_kwh": 300.0, "deadline": "12h", "check_every": "10m", "poll": "15m",
          "resume_overhead": "0h", **kw}
    return PauseResume(trace=trace, clock=clock.time, sleep=clock.sleep, **kw)


def test_pauses_while_dirty_and_resumes_when_clean(trace, tmp_path):
    clock = FakeClock("2023-01-01T00:00:00+00:00")
    steps = SlowSteps(clock)
    policy = pause_resume(clock, trace)
    trainer, model = train(tmp_path, steps, policy)
    assert trainer.state.step == 12
    actions = [(d["action"], d["inputs"].get("step")) for d in policy.decisions]
    assert actions == [("arm", None), ("pause", 6), ("resume", None)]
    pause, resume = policy.decisions[1], policy.decisions[2]
    assert pause["inputs"]["intensity_g_per_kwh"] == 500.0 and pause["at"] == "2023-01-01T02:00:00+00:00"
    assert resume["at"] == "2023-01-01T05:00:00+00:00" and "at or below 300" in resume["inputs"]["reason"]
    assert resume["expected_saving_pct"] == pytest.approx(80.0)  # the shifted work runs at 100 instead of 500
    assert policy.paused_s == pytest.approx(3 * 3600)
    assert steps.step_hours[5] == pytest.approx(2.0) and steps.step_hours[6] == pytest.approx(5 + 1 / 3)
    assert "pausing in memory only" in pause["notes"][0]  # no checkpointing policy offers checkpoint_now()
    summary = policy.summary()
    assert summary["scheduler/paused_s"].value == pytest.approx(3 * 3600)
    # pausing does not change training: same weights as an uninterrupted run
    _, reference = train(tmp_path / "ref", SlowSteps(FakeClock("2023-01-01T00:00:00+00:00")))
    for a, b in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_the_deadline_cuts_a_pause_short(trace, tmp_path):
    clock = FakeClock("2023-01-01T00:00:00+00:00")
    policy = pause_resume(clock, trace, deadline="6h")
    trainer, _ = train(tmp_path, SlowSteps(clock), policy)
    resume = policy.decisions[2]
    assert resume["action"] == "resume" and resume["inputs"]["reason"].startswith("deadline")
    # remaining 6 steps x 20 min x safety 1.2 = 2.4 h before the 6 h deadline -> resume at 3.6 h, still dirty
    assert resume["at"] == "2023-01-01T03:36:00+00:00" and resume["choice"]["intensity_g_per_kwh"] == 500.0
    # later, with 2 steps left (48 min with the margin), a short pause fits again until the grid is clean
    assert [(d["action"], d["at"][11:16]) for d in policy.decisions[3:]] == [("pause", "04:56"), ("resume", "05:11")]
    assert clock.hour() <= 6.0 and trainer.state.step == 12


def test_plan_mode_follows_the_interruptible_plan(trace, tmp_path):
    clock = FakeClock("2023-01-01T00:00:00+00:00")
    policy = pause_resume(clock, trace, mode="plan", threshold_g_per_kwh=None)
    trainer, _ = train(tmp_path, SlowSteps(clock), policy)
    pauses = [d for d in policy.decisions if d["action"] == "pause"]
    assert len(pauses) == 1 and pauses[0]["at"] == "2023-01-01T02:00:00+00:00"
    assert pauses[0]["choice"]["slots"]["slots"] == [3, 4, 5]  # hours 05-08 after 02:00: clean again
    assert policy.decisions[-1]["at"] == "2023-01-01T05:00:00+00:00"
    assert trainer.state.step == 12


def test_checkpoint_through_a_policy_that_offers_it_and_start_now(trace, tmp_path):
    class Checkpointer(Policy):
        events = frozenset()

        def __init__(self) -> None:
            super().__init__(name="ckpt")
            self.calls: list[int] = []

        def checkpoint_now(self, state, reason: str) -> str:
            self.calls.append(state.step)
            return f"memory@{state.step} ({reason})"

    clock = FakeClock("2023-01-01T00:00:00+00:00")
    ckpt = Checkpointer()
    policy = pause_resume(clock, trace)
    train(tmp_path, SlowSteps(clock), policy, ckpt)
    assert ckpt.calls == [6] and "memory@6 (pause_resume)" in policy.decisions[1]["notes"][0]
    other = FakeClock("2023-01-01T00:00:00+00:00")
    never = pause_resume(other, trace, start_now=True)
    train(tmp_path / "b", SlowSteps(other), never)
    assert [d["action"] for d in never.decisions] == ["arm"]


def test_a_pause_request_from_another_policy_is_honoured_and_consumed(trace, tmp_path):
    class Alerts(Policy):  # stands in for efficiency.alerts' carbon_intensity alert
        events = frozenset({Event.STEP_END})

        def __call__(self, event, state, reporter) -> None:
            if state.step == 6:
                state.requests.pause = PauseRequest(by="efficiency.alerts", reason="carbon > 300",
                                                    threshold=300.0, step=state.step)

    clock = FakeClock("2023-01-01T00:00:00+00:00")
    policy = pause_resume(clock, trace, threshold_g_per_kwh=600.0)  # its own level would never pause
    trainer, _ = train(tmp_path, SlowSteps(clock), Alerts(), policy)
    pause, resume = policy.decisions[1], policy.decisions[2]
    assert pause["action"] == "pause" and pause["choice"]["requested_by"] == "efficiency.alerts"
    assert resume["at"] == "2023-01-01T05:00:00+00:00"
    assert trainer.state.requests.pause is None


def test_state_dict_round_trip_keeps_the_deadline(trace):
    clock = FakeClock("2023-01-01T00:00:00+00:00")
    policy = pause_resume(clock, trace)
    policy.deadline = datetime(2023, 1, 1, 12, tzinfo=timezone.utc)
    policy.paused_s, policy.pauses = 10.0, 1
    fresh = pause_resume(clock, trace)
    fresh.load_state_dict(policy.state_dict())
    assert fresh.deadline == policy.deadline and fresh.paused_s == 10.0 and fresh.pauses == 1


@pytest.mark.parametrize(("kw", "key"), [
    ({"mode": "sometimes"}, "scheduler.mode"),
    ({"deadline": "soon"}, "scheduler.deadline"),
    ({"safety": 0.5}, "scheduler.safety"),
    ({"poll": "-5m"}, "scheduler.poll"),
    ({"threshold_g_per_kwh": -1.0}, "scheduler.threshold_g_per_kwh"),
])
def test_bad_arguments_fail_at_construction(trace, kw, key):
    with pytest.raises(ConfigError) as err:
        pause_resume(FakeClock("2023-01-01T00:00:00+00:00"), trace, **kw)
    assert key in {p.key for p in err.value.problems}
