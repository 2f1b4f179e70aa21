"""Batch-size changes between epochs (engine/resize.py): re-planned run, kept sampler, exact resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from greenstack.efficiency.sampler import LengthGroupedSampler
from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy
from greenstack.engine.requests import BatchSizeRequest
from greenstack.engine.resize import retimed, virtual_step
from tests.helpers.snapshots import SnapshotAt


def _collate(batch):
    return {"inputs": torch.stack([t[0] for t in batch]), "labels": torch.stack([t[1] for t in batch])}


def _loader(n=64, batch=8, sampler=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(1))
    ds = TensorDataset(x, (x[:, 0] > 0).long())
    if sampler == "grouped":
        sampler = LengthGroupedSampler(ds, [int(v * 10) % 7 + 1 for v in x[:, 1].abs()], generator=g,
                                       group_by_length=True, bucket_size=32)
        return DataLoader(ds, batch_size=batch, sampler=sampler, generator=g, collate_fn=_collate)
    return DataLoader(ds, batch_size=batch, shuffle=True, generator=g, collate_fn=_collate)


class AskAt(Policy):
    """Requests a batch size once, at a given step, like the low-utilisation alert does."""

    events = frozenset({Event.STEP_END, Event.BATCH_START})

    def __init__(self, step: int, batch_size: int, lr_scaling: str = "none") -> None:
        super().__init__(name="ask")
        self.at, self.batch_size, self.lr_scaling = step, batch_size, lr_scaling
        self.sizes: list[int] = []
        self.lrs: list[float] = []

    def __call__(self, event, state, reporter):
        if event is Event.BATCH_START:
            self.sizes.append(state.batch["labels"].shape[0])
            self.lrs.append(state.optimizer.param_groups[0]["lr"])
        elif state.step == self.at:
            state.requests.batch_size = BatchSizeRequest(batch_size=self.batch_size, lr_scaling=self.lr_scaling,
                                                         by="ask", reason="test")


def _fit(duration: str, *, ask: AskAt, sampler=None, optim: Optim | None = None, extra=()):
    torch.manual_seed(0)
    trainer = Trainer(torch.nn.Linear(4, 2), _loader(sampler=sampler), optim or Optim(lr=0.1),
                      TrainerConfig(max_duration=duration, progress=False), policies=[ask, *extra], batch_size=8)
    return trainer, trainer.fit()


def test_request_mid_epoch_waits_for_the_next_epoch_and_replans_an_epoch_budget():
    ask = AskAt(step=3, batch_size=16)
    trainer, state = _fit("3ep", ask=ask)
    # epoch 0 finishes with 8 batches of 8; epochs 1 and 2 have 4 batches of 16 each
    assert ask.sizes == [8] * 8 + [16] * 8
    assert state.step == state.max_steps == 16 and state.epoch == 3
    assert trainer.train_loader.batch_size == 16 and state.train_loader is trainer.train_loader
    assert state.requests.batch_size is None
    (change,) = state.batch_size_changes
    assert (change["from"], change["to"], change["step"], change["max_steps_before"], change["max_steps_after"]) \
        == (8, 16, 8, 24, 16)


@pytest.mark.parametrize("duration, expected_steps", [("128sp", 8 + 4), ("20ba", 20)])
def test_sample_and_step_budgets_are_kept(duration, expected_steps):
    _, state = _fit(duration, ask=AskAt(step=2, batch_size=16))
    assert state.step == state.max_steps == expected_steps
    assert state.samples_seen == (128 if duration == "128sp" else 64 + 12 * 16)


def test_lr_is_scaled_and_the_schedule_is_retimed_without_a_jump():
    optim = Optim(name="sgd", lr=0.1, schedule="linear", min_lr_ratio=0.0)
    ask = AskAt(step=1, batch_size=16, lr_scaling="linear")
    _, state = _fit("3ep", ask=ask, optim=optim)
    lrs = ask.lrs
    # the linear schedule was planned over 24 steps; after 8 the rest covers 8 steps of 16
    assert lrs[:8] == pytest.approx([0.1 * (1 - s / 24) for s in range(8)])
    assert lrs[8] == pytest.approx(2 * 0.1 * (1 - 8 / 24))  # linear rule: ×2, same point of the schedule
    assert lrs[-1] == pytest.approx(2 * 0.1 * (1 - 22 / 24))  # step 15 of 16 sits at 22 of the 24 planned
    assert state.lr_scheduler.get_last_lr()[0] == pytest.approx(0.0, abs=1e-12)  # ends where planned


def test_custom_sampler_is_kept_and_told_the_new_batch_size():
    trainer, _ = _fit("2ep", ask=AskAt(step=1, batch_size=16), sampler="grouped")
    sampler = trainer.train_loader.sampler
    assert isinstance(sampler, LengthGroupedSampler) and sampler.group_by_length
    assert sampler.bucket_size == 50 * 16


def test_retiming_maps_real_steps_onto_the_planned_schedule():
    segments = [(8, 8.0, 2.0)]
    assert virtual_step(4, segments) == 4 and virtual_step(10, segments) == 12
    fn = retimed(lambda s: float(s), segments)
    assert [fn(s) for s in (0, 7, 8, 9, 12)] == [0, 7, 8, 10, 16]


def test_resume_after_a_resize_continues_exactly():
    optim = Optim(lr=0.05, schedule="cosine")
    snap = SnapshotAt(step=10)  # mid epoch 1, after the change to 16
    first, state = _fit("3ep", ask=AskAt(step=3, batch_size=16), optim=optim, extra=[snap])
    assert snap.snapshot is not None and snap.snapshot.batch_in_epoch == 2
    ask2 = AskAt(step=3, batch_size=16)
    resumed, state2 = _fit("3ep", ask=ask2, optim=optim, extra=[SnapshotAt(restore=snap.snapshot)])
    assert ask2.sizes == [16] * 6  # the 2 remaining batches of epoch 1 and the 4 of epoch 2
    assert state2.step == state.step == 16 and state2.max_steps == 16
    for a, b in zip(first.state.model.parameters(), resumed.state.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert state2.lr_scheduler.get_last_lr() == pytest.approx(state.lr_scheduler.get_last_lr())
