from __future__ import annotations

import json

import pytest

from greenstack.tracking.base import JsonlWriter, load_or_create_run_id
from greenstack.tracking.mlflow_tracker import MlflowTracker
from greenstack.tracking.wandb_tracker import resolve_mode
from tests.helpers.optional import need


def test_run_id_is_stable_in_a_run_dir(tmp_path):
    first = load_or_create_run_id(tmp_path)
    assert load_or_create_run_id(tmp_path) == first
    assert load_or_create_run_id(tmp_path / "other") != first


def test_jsonl_lines_are_valid_json_with_step(tmp_path):
    w = JsonlWriter(tmp_path)
    w.log({"a": float("nan"), "b": 1.5}, step=3)
    w.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 3 and row["a"] is None and row["b"] == 1.5


def test_wandb_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    assert resolve_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"
    assert resolve_mode("offline") == "offline"


def test_mlflow_tracker_logs_to_a_local_store(tmp_path):
    need("mlflow")
    from mlflow.tracking import MlflowClient

    tracker = MlflowTracker(experiment="t")
    tracker.start(run_dir=tmp_path, run_id="abc", run_name="r", config={"optim": {"lr": 0.1}})
    tracker.log({"train/loss": 1.0, "note": "text"}, step=1)
    tracker.log({"train/loss": 0.5}, step=2)
    tracker.summary({"carbon/total_kg_co2e": 0.25})
    tracker.finish()
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.search_runs([client.get_experiment_by_name("t").experiment_id])[0]
    assert run.data.params["optim.lr"] == "0.1"
    assert run.data.tags["greenstack.run_id"] == "abc"
    history = client.get_metric_history(run.info.run_id, "train.loss")
    assert [(m.step, m.value) for m in history] == [(1, 1.0), (2, 0.5)]
    assert run.data.metrics["carbon.total_kg_co2e"] == pytest.approx(0.25)
    assert run.info.status == "FINISHED"
