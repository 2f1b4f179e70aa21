"""Every recipe composes, validates and trains 2 batches on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from greenstack import runner
from greenstack.compose import compose_with_problems
from greenstack.paths import recipes_dir
from greenstack.validate import validate_config
from tests.conftest import FAST, read_jsonl

RECIPES = sorted(p.stem for p in recipes_dir().glob("*.yaml"))
SMALL = {"text_minilm": ["data.batch_size=4", "data.max_length=16"],
         "compress_cnn_digits": ["data.batch_size=16", "compression.export.latency_repeats=2"],
         "distill_text": ["data.batch_size=4", "data.max_length=16"],
         "lm_tiny": ["data.batch_size=4", "data.block_size=16", "data.max_bytes=60000"]}


def test_recipes_exist():
    assert "quickstart" in RECIPES and len(RECIPES) >= 3


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_composes_validates_and_trains_two_batches(recipe, tmp_path, text_csv_file, monkeypatch):
    monkeypatch.setenv("GREENSTACK_CACHE_DIR", str(tmp_path / "cache"))  # tokenisation caches stay in the test
    overrides = [f"recipe={recipe}", *FAST, *SMALL.get(recipe, [])]
    cfg, problems = compose_with_problems(overrides)
    assert cfg is not None and not problems
    missing = [p for p in validate_config(cfg) if p.value == "???"]
    if missing:  # recipes for the user's own data: give them a real file
        assert [p.key for p in missing] == ["data.path"]
        cfg, _ = compose_with_problems([*overrides, f"data.path={text_csv_file}"])
    assert validate_config(cfg) == []
    summary = runner.run(cfg, tmp_path / "run")
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    metric = "perplexity" if cfg.task._target_.endswith("CausalLM") else "accuracy"
    assert any(f"val/{metric}" in r for r in rows)
    assert any(f"test/{metric}" in r for r in rows)
    assert (tmp_path / "run" / "model.safetensors").stat().st_size > 1000
    written = json.loads(Path(tmp_path / "run" / "sustainability.json").read_text())
    assert written["run_id"] == summary["run_id"]
    for fig in written["metrics"].values():
        assert fig["provenance"] in ("measured", "estimated", "fallback") and fig["source"]
