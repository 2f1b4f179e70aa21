"""A real Hugging Face `Trainer` and a real Lightning `Trainer` with greenstack's callbacks.

Tiny models built from config (no download), a few CPU steps; the TDP meter with a fixed power and a
static intensity make the figures checkable (kg = kWh x 0.4).
"""

from __future__ import annotations

import json
import time

import pandas as pd
import pytest
import torch

from greenstack.ledger.audit import verify
from tests.conftest import read_jsonl

STATIC = {"kind": "static", "intensity_g_per_kwh": 400.0, "zone": None}
TDP = {"meter": "tdp", "tdp_w": 100.0, "interval_s": 0.05}
STOP = {**STATIC, "budget_kg": 1e-12, "budget_action": "stop"}
RUN_FILES = ("sustainability.json", "emissions.csv", "audit.jsonl", "report.html")


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models on a shared CPU: one intra-op thread is several times faster than oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check_run_dir(run_dir, steps: int) -> dict:
    for name in RUN_FILES:
        assert (run_dir / name).is_file(), name
    summary = json.loads((run_dir / "sustainability.json").read_text())
    m = summary["metrics"]
    assert m["train/steps"]["value"] == steps
    kwh = m["energy/total_kwh"]["value"]
    assert kwh > 0 and m["carbon/total_kg_co2e"]["value"] == pytest.approx(kwh * 0.4, rel=1e-6)
    assert m["energy/j_per_sample"]["value"] == pytest.approx(kwh * 3.6e6 / m["train/samples"]["value"])
    assert m["energy/total_kwh"]["provenance"] == "estimated"  # TDP energy: never "measured"
    row = pd.read_csv(run_dir / "emissions.csv").iloc[-1]
    assert row["emissions"] == pytest.approx(m["carbon/total_kg_co2e"]["value"])
    assert verify(run_dir / "audit.jsonl").ok
    return summary


# -- Hugging Face -----------------------------------------------------------------------------------
def _hf_trainer(tmp_path, callback, recorder, max_steps=6):
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=16, num_labels=2,
                                                     max_position_embeddings=16))
    data = [{"input_ids": torch.randint(0, 32, (8,)), "labels": torch.tensor(i % 2)} for i in range(32)]
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=max_steps,
                             logging_steps=2, report_to=[], use_cpu=True, save_strategy="no",
                             include_num_input_tokens_seen=True, disable_tqdm=True)
    # the recorder stands for a reporting callback (W&B, MLflow, ...) registered before ours
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder, callback])


def _recorder():
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self) -> None:
            self.logs: list[dict] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs or {}))

    return Recorder()


def test_hf_trainer_with_callback_logs_figures_and_writes_the_run_dir(tmp_path):
    from greenstack.integrations.hf import GreenstackCallback

    callback = GreenstackCallback(carbon=STATIC, energy=TDP)
    recorder = _recorder()
    trainer = _hf_trainer(tmp_path, callback, recorder)
    trainer.train()
    run_dir = tmp_path / "hf" / "greenstack"
    summary = _check_run_dir(run_dir, steps=6)
    assert summary["stopped_early"] is None
    assert summary["metrics"]["train/samples"]["value"] == 24
    tokens = summary["metrics"]["energy/j_per_token"]
    assert tokens["value"] == pytest.approx(summary["metrics"]["energy/total_kwh"]["value"] * 3.6e6 / (24 * 8))
    step_logs = [row for row in recorder.logs if "loss" in row]
    assert len(step_logs) == 3  # logging_steps=2 of 6
    # the reporting callback saw greenstack's figures in the same logs dict (cumulative, as metered so far)
    kg = [row["carbon/total_kg_co2e"] for row in step_logs]
    assert kg == sorted(kg) and kg[0] > 0  # each logging step reads the meters first (fast steps too)
    assert step_logs[-1]["energy/j_per_token"] > 0 and step_logs[-1]["energy/j_per_sample"] > 0
    assert any("carbon/total_kg_co2e" in h for h in trainer.state.log_history)
    final = recorder.logs[-1]  # the run summary, through the Trainer's loggers
    assert final["greenstack/carbon/total_kg_co2e"] == pytest.approx(summary["metrics"]["carbon/total_kg_co2e"]["value"])
    assert callback.summary["run_id"] == summary["run_id"]


def test_hf_budget_below_the_emissions_stops_training_early(tmp_path):
    from greenstack.integrations.hf import GreenstackCallback

    callback = GreenstackCallback(carbon=STOP, energy=TDP)
    trainer = _hf_trainer(tmp_path, callback, _recorder(), max_steps=200)
    trainer.train()
    assert trainer.state.global_step < 200
    summary = _check_run_dir(tmp_path / "hf" / "greenstack", steps=trainer.state.global_step)
    assert "exceed carbon.budget_kg=1e-12" in summary["stopped_early"]
    assert summary["carbon_budget"]["action"] == "stop"
    audit = read_jsonl(tmp_path / "hf" / "greenstack" / "audit.jsonl")
    assert [r["kind"] for r in audit] == ["schedule", "budget"]


# -- Lightning --------------------------------------------------------------------------------------
def _lightning_fit(tmp_path, callback, max_epochs=2):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(8, 2)

        def training_step(self, batch, batch_idx):
            time.sleep(0.01)  # steps as long as a few meter intervals overall, so the logged figures move
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 8), torch.randint(0, 2, (32,)))
    logger = CSVLogger(str(tmp_path / "pl"), name="logs")
    trainer = pl.Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=logger, log_every_n_steps=2,
                         callbacks=[callback], enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False, default_root_dir=str(tmp_path / "pl"))
    trainer.fit(Tiny(), torch.utils.data.DataLoader(data, batch_size=4))
    return trainer, logger


def test_lightning_trainer_with_callback_logs_figures_and_writes_the_run_dir(tmp_path):
    from greenstack.integrations.lightning import GreenstackCallback

    callback = GreenstackCallback(carbon=STATIC, energy=TDP)
    trainer, logger = _lightning_fit(tmp_path, callback)
    assert trainer.global_step == 16
    summary = _check_run_dir(tmp_path / "pl" / "greenstack", steps=16)
    assert summary["stopped_early"] is None and summary["metrics"]["train/samples"]["value"] == 64
    logged = pd.read_csv(f"{logger.log_dir}/metrics.csv")
    steps = logged.dropna(subset=["energy/total_kwh"])
    assert len(steps) == 8  # log_every_n_steps=2 of 16 steps
    assert steps["carbon/total_kg_co2e"].is_monotonic_increasing and steps["carbon/total_kg_co2e"].iloc[-1] > 0
    assert steps["energy/j_per_sample"].iloc[-1] > 0
    final = logged.dropna(subset=["greenstack/carbon/total_kg_co2e"]).iloc[-1]
    assert final["greenstack/carbon/total_kg_co2e"] == pytest.approx(summary["metrics"]["carbon/total_kg_co2e"]["value"])


def test_lightning_budget_below_the_emissions_stops_training_early(tmp_path):
    from greenstack.integrations.lightning import GreenstackCallback

    callback = GreenstackCallback(carbon=STOP, energy=TDP)
    trainer, _ = _lightning_fit(tmp_path, callback, max_epochs=50)
    assert trainer.global_step < 400
    summary = _check_run_dir(tmp_path / "pl" / "greenstack", steps=trainer.global_step)
    assert "exceed carbon.budget_kg=1e-12" in summary["stopped_early"]
    assert summary["carbon_budget"]["action"] == "stop"
    assert "budget" in [r["kind"] for r in read_jsonl(tmp_path / "pl" / "greenstack" / "audit.jsonl")]


def test_callbacks_reject_a_bad_config_before_training(tmp_path):
    from greenstack.errors import ConfigError
    from greenstack.integrations.hf import GreenstackCallback as HF
    from greenstack.integrations.lightning import GreenstackCallback as PL

    for cls in (HF, PL):
        with pytest.raises(ConfigError) as err:
            cls(tmp_path / "x", carbon={"pue": 0.1}, energy={"meter": "geiger"})
        assert {"carbon.pue", "energy.meter"} <= {p.key for p in err.value.problems}


def test_lightning_callback_waits_for_the_window_unless_started_now(tmp_path, monkeypatch):
    """The scheduler's start decision before the first batch (fake clock), and the START_NOW file route."""
    from datetime import datetime, timezone

    import numpy as np

    from greenstack.integrations.lightning import GreenstackCallback

    monkeypatch.delenv("GREENSTACK_START_NOW", raising=False)
    times = pd.date_range("2022-11-01", "2023-01-20", freq="h", tz="UTC", inclusive="left")
    trace = tmp_path / "trace.csv"
    pd.DataFrame({"timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "carbon_intensity": np.where(times.hour.isin((2, 3, 4, 5)), 100.0, 300.0)}).to_csv(trace, index=False)
    clock = {"t": datetime(2023, 1, 9, 10, 30, tzinfo=timezone.utc).timestamp()}
    sched = [f"scheduler.trace={trace}", "scheduler.duration=3h", "scheduler.replan=false", "scheduler.tick_s=600"]

    def make(run_dir):
        return GreenstackCallback(run_dir, carbon=STATIC, energy=TDP, scheduler="forecast_window", overrides=sched,
                                  clock=lambda: clock["t"], sleep=lambda s: clock.__setitem__("t", clock["t"] + s))

    _lightning_fit(tmp_path / "wait", make(tmp_path / "wait" / "gs"), max_epochs=1)
    assert datetime.fromtimestamp(clock["t"], tz=timezone.utc) == datetime(2023, 1, 10, 2, tzinfo=timezone.utc)
    summary = json.loads((tmp_path / "wait" / "gs" / "sustainability.json").read_text())
    assert summary["metrics"]["scheduler/wait_s"]["value"] == pytest.approx(15.5 * 3600)
    assert [r["data"]["action"] for r in read_jsonl(tmp_path / "wait" / "gs" / "audit.jsonl")][:2] == ["wait", "start"]

    (tmp_path / "now" / "gs").mkdir(parents=True)
    (tmp_path / "now" / "gs" / "START_NOW").touch()
    before = clock["t"] = datetime(2023, 1, 9, 10, 30, tzinfo=timezone.utc).timestamp()
    _lightning_fit(tmp_path / "now", make(tmp_path / "now" / "gs"), max_epochs=1)
    assert clock["t"] == before
    assert read_jsonl(tmp_path / "now" / "gs" / "audit.jsonl")[0]["data"]["action"] == "start_now"
