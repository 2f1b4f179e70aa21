"""The compression recipe validates from the command line and trains, exports and measures in 2 batches."""

from __future__ import annotations

import json

import pytest
import torch

from greenstack import runner
from greenstack.compose import compose_with_problems
from greenstack.compression import load_compressed
from greenstack.validate import validate_config
from tests.conftest import FAST, read_jsonl

RECIPE = "compress_cnn_digits"
SMALL = ["data.batch_size=16"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_validate_passes_for_the_compression_recipe(cli):
    result = cli("validate", f"recipe={RECIPE}", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.lower()


def test_validate_reports_bad_compression_settings_with_keys():
    cfg, problems = compose_with_problems([f"recipe={RECIPE}", "compression.prune.final_sparsity=1.2",
                                           "compression.prune.start=0.6dur", "compression.prune.end=0.2dur",
                                           "compression.qat.backend=tensorrt"])
    assert cfg is not None and not problems
    keys = {p.key for p in validate_config(cfg)}  # every problem at once, before anything is built
    assert {"compression.prune.final_sparsity", "compression.prune.end", "compression.qat.backend"} <= keys


def test_compression_recipe_trains_exports_and_measures(tmp_path):
    cfg, problems = compose_with_problems([f"recipe={RECIPE}", *FAST, *SMALL])
    assert cfg is not None and not problems and validate_config(cfg) == []
    summary = runner.run(cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    metrics = json.loads((tmp_path / "run" / "sustainability.json").read_text())["metrics"]
    assert metrics["compression/qat_backend"]["value"] == "ao_fx"
    assert metrics["compression/prune_sparsity"]["value"] >= 0.8 - 1e-3
    assert metrics["compression/sparsity"]["value"] >= 0.8 - 1e-3
    assert metrics["compression/size_ratio"]["value"] >= 8  # int8 + 80 % sparse vs dense fp32
    for key in ("latency_ms", "dense_latency_ms", "accuracy_before", "accuracy_after", "parameters"):
        fig = metrics[f"compression/{key}"]
        assert fig["provenance"] == "measured" and fig["source"], key
    assert summary["flat"]["compression/size_ratio"] == metrics["compression/size_ratio"]["value"]
    model = load_compressed(tmp_path / "run" / "compressed")
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 10)
