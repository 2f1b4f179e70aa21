"""data=hf_local: local parquet/jsonl/csv/arrow files and save_to_disk directories, with a tokenisation cache."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("datasets")  # the `hf` extra (in `dev`, so CI has it)

import datasets  # noqa: E402

from greenstack.data import hf_local  # noqa: E402
from greenstack.data.builders import synthetic_text_rows  # noqa: E402
from greenstack.errors import ConfigError  # noqa: E402
from greenstack.validate import validate_config  # noqa: E402


def _rows(n: int = 48) -> dict[str, list]:
    texts, labels = synthetic_text_rows(n, 3, seed=1)
    return {"body": texts, "topic": labels, "score": [float(len(t)) for t in texts]}


@pytest.fixture
def files(tmp_path):
    ds = datasets.Dataset.from_dict(_rows())
    out = {"parquet": tmp_path / "d.parquet", "jsonl": tmp_path / "d.jsonl", "csv": tmp_path / "d.csv",
           "disk": tmp_path / "saved"}
    ds.to_parquet(str(out["parquet"]))
    ds.to_json(str(out["jsonl"]))
    ds.to_csv(str(out["csv"]), index=False)
    ds.save_to_disk(str(out["disk"]))
    return out


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv", "disk"])
def test_every_format_gives_the_same_labelled_rows(files, fmt, tmp_path):
    data = hf_local(str(files[fmt]), text_column="body", label_column="topic", tokenizer="byte", max_length=32,
                    batch_size=8, cache_dir=str(tmp_path / "cache"))
    assert data.target == "class" and data.num_classes == 3 and sum(data.sizes().values()) == 48
    batch = next(iter(data.train))
    assert batch["labels"].dtype == torch.long and batch["inputs"]["input_ids"].shape[1] <= 32


def test_value_labels_make_a_regression_set(files, tmp_path):
    data = hf_local(str(files["parquet"]), text_column="body", label_column="score", label_kind="value",
                    tokenizer="byte", batch_size=8, cache_dir=str(tmp_path / "c"))
    batch = next(iter(data.train))
    assert data.target == "value" and data.num_classes == 1 and batch["labels"].dtype == torch.float32


def test_lm_corpus_is_packed_and_cached_so_a_rerun_reads_no_text(files, tmp_path, monkeypatch):
    kw = dict(text_column="body", tokenizer="bpe:300", block_size=16, batch_size=4, cache_dir=str(tmp_path / "c"))
    first = hf_local(str(files["jsonl"]), **kw)
    assert first.target == "next_token" and "cache hit" not in first.source
    assert first.num_classes == 300 and "data/unigram_perplexity" in first.figures

    def no_reading(*a, **k):
        raise AssertionError("the cached tokenisation should not load the data again")

    monkeypatch.setattr("greenstack.data.hf._load", no_reading)
    again = hf_local(str(files["jsonl"]), **kw)
    assert "cache hit" in again.source
    assert torch.equal(first.train.dataset.blocks, again.train.dataset.blocks)


def test_bad_paths_and_columns_are_clear_errors(files, tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        hf_local(str(tmp_path / "nope.parquet"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ConfigError, match="unsupported file type"):
        hf_local(str(tmp_path / "x.txt"))
    with pytest.raises(ConfigError, match="column 'text' not in"):
        hf_local(str(files["csv"]), label_column="topic", tokenizer="byte", cache_dir=str(tmp_path / "c"))


def test_validate_checks_hf_local_and_its_task(files):
    from greenstack.compose import compose_with_problems

    cfg, _ = compose_with_problems(["tracker=none", "task=causal_lm", "model=gpt2_tiny", "data=hf_local",
                                    f"data.path={files['parquet']}", "data.text_column=body", "data.tokenizer=byte"])
    assert validate_config(cfg) == []
    cfg, _ = compose_with_problems(["tracker=none", "task=causal_lm", "model=gpt2_tiny", "data=hf_local",
                                    f"data.path={files['parquet']}", "data.label_column=topic"])
    assert [p.key for p in validate_config(cfg)] == ["data._target_"]
    cfg, _ = compose_with_problems(["tracker=none", "data=hf_local", "data.path=/nonexistent/*.parquet"])
    assert "data.path" in {p.key for p in validate_config(cfg)}


@pytest.mark.slow
def test_train_causal_lm_on_hf_local_and_on_a_stream_end_to_end(files, tmp_path, monkeypatch):
    """`greenstack train task=causal_lm data=hf_local|stream ...` as the runner runs it: perplexity and
    energy per token land in metrics.jsonl and sustainability.json."""
    import json

    from greenstack import runner
    from greenstack.compose import compose_with_problems
    from tests.conftest import FAST, read_jsonl

    monkeypatch.setenv("GREENSTACK_CACHE_DIR", str(tmp_path / "cache"))
    shards = tmp_path / "shards"
    shards.mkdir()
    datasets.Dataset.from_dict(_rows()).to_json(str(shards / "part-0.jsonl"))
    model = ["task=causal_lm", "model=gpt2_tiny", "model.config.n_layer=1", "model.config.n_embd=32",
             "model.config.n_head=2", "model.config.n_positions=32"]
    for name, data in (("hf", ["data=hf_local", f"data.path={files['parquet']}", "data.text_column=body",
                               "data.tokenizer=byte", "data.block_size=16", "data.batch_size=4"]),
                       ("stream", ["data=stream", f"data.url={shards}", f"data.val_url={shards}",
                                   "data.text_column=body", "data.max_length=16", "data.batch_size=4"])):
        cfg, problems = compose_with_problems([*FAST, *model, *data])
        assert cfg is not None and not problems and validate_config(cfg) == []
        runner.run(cfg, tmp_path / name)
        rows = read_jsonl(tmp_path / name / "metrics.jsonl")
        assert any("val/perplexity" in r for r in rows) and any("energy/j_per_token" in r for r in rows)
        metrics = json.loads((tmp_path / name / "sustainability.json").read_text())["metrics"]
        assert metrics["energy/j_per_token"]["unit"] == "J/token" and metrics["energy/j_per_token"]["provenance"]
        assert metrics["val/perplexity"]["value"] > 1 and metrics["train/tokens"]["value"] > 0
