"""A diverging run stops with a clear message naming the step, keeps its last good checkpoint, and
nothing greenstack writes is non-standard JSON (issue 22 item 5)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from greenstack.checkpoint.store import Store
from greenstack.engine.loop import NonFiniteLoss, Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.io import atomic_write_json, dumps
from greenstack.policies.checkpointing.hierarchical import HierarchicalCheckpointing


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _batches(n=8):
    torch.manual_seed(0)
    x = torch.randn(n * 8, 4)
    return [{"inputs": x[i:i + 8], "labels": (x[i:i + 8, 0] > 0).long()} for i in range(0, n * 8, 8)]


class _BlowUp(torch.nn.Module):
    """A model whose loss turns inf from step `at` on: deterministic divergence."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 2)
        self.at, self.calls = at, 0

    def forward(self, x):
        self.calls += 1
        out = self.lin(x)
        return out * math.inf if self.calls >= self.at else out


@pytest.mark.parametrize("log_interval", [1, 100])
def test_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, log_interval):
    ckpt = HierarchicalCheckpointing(memory_every=1, local_every=1, local_keep=10, local_dir=str(tmp_path))
    trainer = Trainer(_BlowUp(at=5), _batches(), Optim(lr=0.1),
                      TrainerConfig(max_duration="2ep", progress=False, log_interval=log_interval),
                      policies=[ckpt], batch_size=8)
    with pytest.raises(NonFiniteLoss, match="at step 5"):
        trainer.fit()
    assert trainer.state.step <= 5  # stopped at once, not trained to the end
    snapshot, name, _ = Store(str(tmp_path)).load_latest()
    # the newest snapshot predates the bad step (4 at best: the local tier skips a save while it is
    # still writing the previous one, so on a slow disk or a busy machine it can be older)
    assert snapshot is not None and 1 <= snapshot.step <= 4
    assert all(bool(t.isfinite().all()) for t in snapshot.model.values())


def test_huge_learning_rate_never_publishes_nan_weights(tmp_path):
    """lr=1e30: the loss of step 1 is finite but its update makes every weight nan; no checkpoint holds them."""
    ckpt = HierarchicalCheckpointing(memory_every=1, local_every=1, local_keep=10, local_dir=str(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    trainer = Trainer(model, _batches(), Optim(lr=1e30, name="sgd"), TrainerConfig(max_duration="2ep", progress=False),
                      policies=[ckpt], batch_size=8)
    with pytest.raises(NonFiniteLoss, match="diverged"):
        trainer.fit()
    from greenstack.checkpoint.codec import decode

    store = Store(str(tmp_path))
    for name in store.names():
        assert all(bool(t.isfinite().all()) for t in decode(store.read(name)).model.values()), name


def test_json_writes_null_and_a_note_instead_of_bare_nan(tmp_path):
    doc = {"metrics": {"train/loss": {"value": math.nan, "unit": ""}, "x": [1.0, math.inf]}, "ok": 1.5}
    text = dumps(doc)
    parsed = _strict(text)
    assert parsed["metrics"]["train/loss"]["value"] is None and parsed["metrics"]["x"] == [1.0, None]
    assert parsed["non_finite"] == ["metrics.train/loss.value: nan", "metrics.x[1]: inf"]
    atomic_write_json(tmp_path / "s.json", doc)
    assert _strict((tmp_path / "s.json").read_text())["ok"] == 1.5
    assert doc["metrics"]["train/loss"]["value"] != doc["metrics"]["train/loss"]["value"]  # input untouched


def test_a_diverging_cli_run_exits_non_zero_with_one_clear_line_and_standard_json(tmp_path, capsys):
    from greenstack.cli import main

    run_dir = tmp_path / "run"
    code = main(["train", "data=synthetic_image", "data.num_samples=64", "data.batch_size=16", "data.image_size=16",
                 "model.name=resnet10t", "optim.lr=1e30", "optim=sgd", "trainer.max_duration=4ba",
                 "trainer.progress=false", "trainer.log_interval=1", "tracker=none", "checkpointing=hierarchical",
                 "checkpointing.local_every=1", "energy.interval_s=0.2", f"hydra.run.dir={run_dir}"])
    out = capsys.readouterr()
    text = out.out + out.err
    assert code != 0 and "training diverged" in text and "Traceback" not in text and "HYDRA_FULL_ERROR" not in text
    assert (run_dir / "sustainability.json").is_file()  # the run's partial accounting, flagged
    for path in [run_dir / "metrics.jsonl", *run_dir.glob("*.json")]:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            _strict(line)
    assert "diverged" in (run_dir / "train.log").read_text()
