"""A trained run can be used: its class names, preprocessing and (text) tokenizer are saved with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from greenstack import runner
from greenstack.compose import compose_with_problems
from greenstack.errors import ConfigError
from greenstack.inference import predict_text
from tests.conftest import FAST, _env


def _train(tmp_path, *overrides):
    cfg, problems = compose_with_problems([*overrides, *FAST])
    assert not problems, problems
    runner.run(cfg, tmp_path)
    return tmp_path


@pytest.mark.slow
def test_text_run_loads_as_documented_and_predicts_class_names(tmp_path):
    run_dir = _train(tmp_path / "run", "data=synthetic_text", "model=bert_tiny", "data.num_samples=64",
                     "data.batch_size=8", "data.max_length=16")
    labels = json.loads((run_dir / "labels.json").read_text())
    assert labels["kind"] == "text" and labels["labels"] == ["topic0", "topic1", "topic2", "topic3"]
    assert labels["preprocessing"]["max_length"] == 16 and labels["model_dir"] == "model"
    # the README's way: transformers' pipeline on RUN_DIR/model, offline
    from transformers import AutoModelForSequenceClassification, pipeline

    classify = pipeline("text-classification", model=str(run_dir / "model"), device="cpu")
    out = classify(["the striker scored a late goal", "the central bank raised rates"])
    assert all(o["label"] in labels["labels"] for o in out), out
    # it is the run's trained model, not a fresh head: same weights as model.safetensors
    model = AutoModelForSequenceClassification.from_pretrained(str(run_dir / "model"), local_files_only=True)
    trained = load_file(str(run_dir / "model.safetensors"))
    assert trained and all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    assert model.config.id2label == dict(enumerate(labels["labels"]))
    # and the CLI shortcut
    done = subprocess.run([sys.executable, "-m", "greenstack", "predict", str(run_dir), "--text", "a goal",
                           "--text", "rates rose", "--json"], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a goal", "rates rose"]
    assert all(r["label"] in labels["labels"] and 0 < r["score"] <= 1 for r in rows)


def test_image_run_saves_class_names_and_normalisation(tmp_path):
    run_dir = _train(tmp_path / "run", "data=synthetic_image", "model.name=resnet10t", "data.num_samples=64",
                     "data.batch_size=8", "data.image_size=16", "data.num_classes=3")
    labels = json.loads((run_dir / "labels.json").read_text())
    assert labels["kind"] == "image" and labels["labels"] == ["class0", "class1", "class2"]
    pre = labels["preprocessing"]
    assert pre["image_size"] == 16 and len(pre["mean"]) == len(pre["std"]) == 3
    assert labels["model_dir"] is None and not (run_dir / "model").exists()
    with pytest.raises(ConfigError, match="predict works on text runs"):
        predict_text(run_dir, ["x"])
