from __future__ import annotations

import math

import pytest
import torch

from greenstack.engine.duration import Duration
from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy
from greenstack.errors import ConfigError
from greenstack.policies.early_stopping import EarlyStopping
from greenstack.tasks.base import has_improved


@pytest.mark.parametrize(("text", "steps"), [("2ep", 20), ("500ba", 500), ("0.5dur", 50), ("640sp", 10),
                                             (7, 7), ("1e2ba", 100)])
def test_duration_to_steps(text, steps):
    assert Duration.parse(text).to_steps(steps_per_epoch=10, total_steps=100, batch_size=64) == steps


@pytest.mark.parametrize("bad", ["2 epochs", "ep", "-1ep", "1.5dur", True, "3xx"])
def test_duration_rejects_bad_strings_with_key(bad):
    with pytest.raises(ConfigError) as err:
        Duration.parse(bad, key="trainer.max_duration")
    assert err.value.problems[0].key == "trainer.max_duration"


def test_cosine_schedule_with_warmup():
    optim = Optim(lr=1.0, schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    f = optim.lr_factor_fn(110)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert f(110) == pytest.approx(0.1)


def test_optim_lists_every_problem():
    with pytest.raises(ConfigError) as err:
        Optim(name="lion", lr=-1, schedule="weird")  # type: ignore[arg-type]
    assert {p.key for p in err.value.problems} == {"optim.name", "optim.lr", "optim.schedule"}


def _toy(n=64, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] > 0).long()
    batches = [{"inputs": x[i:i + batch], "labels": y[i:i + batch]} for i in range(0, n, batch)]
    return batches


class Recorder(Policy):
    events = frozenset(Event)

    def __init__(self, **kw):
        super().__init__(**kw)
        self.seen: list[tuple[Event, int]] = []

    def __call__(self, event, state, reporter):
        self.seen.append((event, state.step))


def test_loop_dispatches_events_in_order_and_respects_window():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    always, windowed = Recorder(), Recorder(start="3ba", end="5ba")
    trainer = Trainer(model, _toy(), Optim(lr=0.1), TrainerConfig(max_duration="1ep", progress=False),
                      val_loader=_toy(16), policies=[always, windowed], batch_size=8)
    state = trainer.fit()
    assert state.step == 8
    events = [e for e, _ in always.seen]
    assert events[:3] == [Event.INIT, Event.FIT_START, Event.EPOCH_START]
    assert events[-1] == Event.FIT_END
    assert events.count(Event.STEP_END) == 8
    assert events.index(Event.EVAL_END) < events.index(Event.EPOCH_END)
    steps_in_window = {s for e, s in windowed.seen if e is Event.STEP_END}
    # STEP_END is dispatched after the step counter moved, so steps 3 and 4 are inside [3, 5)
    assert steps_in_window == {3, 4}


def test_grad_accumulation_matches_a_larger_batch():
    data = _toy(64, 8)
    big = [{"inputs": torch.cat([a["inputs"], b["inputs"]]), "labels": torch.cat([a["labels"], b["labels"]])}
           for a, b in zip(data[::2], data[1::2], strict=True)]
    results = []
    for loader, accum in ((data, 2), (big, 1)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        Trainer(model, loader, Optim(name="sgd", lr=0.1, momentum=0.0),
                TrainerConfig(max_duration="1ep", grad_accum=accum, progress=False), batch_size=8).fit()
        results.append(model.weight.detach().clone())
    assert torch.allclose(results[0], results[1], atol=1e-6)


def test_same_seed_same_result_and_logged_metrics():
    class Sink:
        def __init__(self):
            self.rows = []

        def log(self, metrics, step):
            self.rows.append((step, dict(metrics)))

    losses = []
    for _ in range(2):
        torch.manual_seed(1)
        sink = Sink()
        model = torch.nn.Linear(4, 2)
        t = Trainer(model, _toy(), Optim(lr=0.05), TrainerConfig(max_duration="2ep", log_interval=4, progress=False),
                    val_loader=_toy(16), test_loader=_toy(16, seed=5), sinks=[sink], batch_size=8)
        t.fit()
        losses.append([m["train/loss"] for _, m in sink.rows if "train/loss" in m])
        assert any("val/accuracy" in m for _, m in sink.rows)
        assert "test/accuracy" in sink.rows[-1][1] or any("test/accuracy" in m for _, m in sink.rows)
        assert [s for s, m in sink.rows if "train/loss" in m] == [4, 8, 12, 16]
    assert losses[0] == losses[1]
    assert not math.isnan(losses[0][-1])


def test_early_stopping_stops_after_patience():
    assert has_improved(0.5, math.nan, mode="min", min_delta=0)
    assert not has_improved(0.5, 0.5, mode="min", min_delta=0)
    assert has_improved(0.6, 0.5, mode="max", min_delta=0.05)

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.zeros(x.shape[0], 2, device=self.w.device) + 0 * self.w  # on the model's device

    stopper = EarlyStopping(monitor="val/loss", patience=2)
    trainer = Trainer(Flat(), _toy(), Optim(lr=0.1), TrainerConfig(max_duration="10ep", progress=False),
                      val_loader=_toy(16), policies=[stopper], batch_size=8)
    state = trainer.fit()
    assert state.stop and "val/loss" in state.stop_reason
    assert state.epoch == 3  # first eval sets best, two more without improvement
    assert stopper.state_dict()["bad_evals"] == 2


def test_policy_window_end_before_start_is_rejected():
    from greenstack.engine.state import State

    p = Recorder(start="5ba", end="2ba")
    with pytest.raises(ConfigError, match="before start"):
        p.resolve_window(State(model=torch.nn.Linear(1, 1), max_steps=10, steps_per_epoch=5))


def test_set_batch_size_rebuilds_loader_and_replans_before_training():
    from torch.utils.data import DataLoader, TensorDataset

    x = torch.randn(64, 4)
    ds = TensorDataset(x, (x[:, 0] > 0).long())
    collate = lambda b: {"inputs": torch.stack([t[0] for t in b]), "labels": torch.stack([t[1] for t in b])}  # noqa: E731
    loader = DataLoader(ds, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0), collate_fn=collate)
    seen = []

    class Grow(Policy):
        events = frozenset({Event.INIT, Event.BATCH_START})

        def __call__(self, event, state, reporter):
            if event is Event.INIT:
                state.set_batch_size(16)
            else:
                seen.append(state.batch["labels"].shape[0])

    trainer = Trainer(torch.nn.Linear(4, 2), loader, Optim(lr=0.1), TrainerConfig(max_duration="2ep", progress=False),
                      policies=[Grow()], batch_size=8)
    assert trainer.state.max_steps == 16
    state = trainer.fit()
    assert state.batch_size == 16 and state.max_steps == 8 and state.step == 8
    assert set(seen) == {16}
    with pytest.raises(RuntimeError, match="before the first step"):
        state.set_batch_size(32)
