"""Tasks (classification, causal_lm, regression), LM packing and caching, and task/model/data validation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from greenstack.compose import compose_with_problems
from greenstack.data.lm import block_collate, pack_blocks, pack_corpus, unigram_perplexity
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.errors import ConfigError
from greenstack.tasks import CausalLM, Classification, Regression
from greenstack.validate import validate_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_classification_matches_cross_entropy_and_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    batch = {"labels": torch.tensor([0, 0, 0])}
    task = Classification()
    assert torch.equal(task.loss(logits, batch), F.cross_entropy(logits, batch["labels"]))
    ev = task.evaluator(torch.device("cpu"))
    ev.update(logits, batch)
    out = ev.compute("val")
    assert out["val/accuracy"] == pytest.approx(2 / 3)
    assert out["val/loss"] == pytest.approx(F.cross_entropy(logits, batch["labels"]).item())
    assert task.tokens(batch) == 0


def test_causal_lm_ignores_padding_and_counts_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[1, 2, 3, -100], [4, -100, -100, -100]])
    batch = {"labels": labels}
    task = CausalLM()
    valid = labels != -100
    expected = F.cross_entropy(logits[valid], labels[valid])
    assert task.loss(logits, batch).item() == pytest.approx(expected.item(), rel=1e-6)
    assert task.tokens(batch) == 4
    ev = task.evaluator(torch.device("cpu"))
    ev.update(logits, batch)
    out = ev.compute("test")
    assert out["test/tokens"] == 4 and out["test/samples"] == 2
    assert out["test/perplexity"] == pytest.approx(math.exp(expected.item()), rel=1e-5)
    with pytest.raises(ConfigError):
        CausalLM(ignore_index=0)


def test_regression_mse_and_mae():
    outputs = torch.tensor([[1.0], [2.0], [4.0]])
    batch = {"labels": torch.tensor([1.0, 3.0, 1.0])}
    task = Regression()
    assert task.loss(outputs, batch).item() == pytest.approx((0 + 1 + 9) / 3)
    ev = task.evaluator(torch.device("cpu"))
    ev.update(outputs, batch)
    out = ev.compute("val")
    assert out["val/mse"] == pytest.approx(10 / 3) and out["val/mae"] == pytest.approx(4 / 3)


def test_regression_trains_a_linear_model():
    torch.manual_seed(0)
    x = torch.randn(64, 3)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3
    sets = [[(x[i], y[i]) for i in range(a, b)] for a, b in ((0, 48), (48, 64))]
    collate = lambda rows: {"inputs": torch.stack([r[0] for r in rows]), "labels": torch.stack([r[1] for r in rows])}  # noqa: E731
    train = torch.utils.data.DataLoader(sets[0], batch_size=16, shuffle=True, collate_fn=collate,
                                        generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(sets[1], batch_size=16, collate_fn=collate)
    model = torch.nn.Linear(3, 1)
    trainer = Trainer(model, train, Optim(name="adamw", lr=0.2), TrainerConfig(max_duration="15ep", progress=False,
                      device="cpu", eval_interval="15ep"), val_loader=val, batch_size=16, task=Regression())
    before = trainer.evaluate_split(model, "val")["val/mse"]
    trainer.fit()
    assert trainer.last_eval["val/mse"] < 0.05 * before
    assert {"val/mae", "val/loss"} <= trainer.last_eval.keys()


def test_packing_makes_every_token_a_target_exactly_once():
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    blocks = pack_blocks(docs, block_size=4, eos_id=0)
    stream = torch.tensor([1, 2, 3, 0, 4, 5, 0, 6, 7, 8, 9, 0])
    assert blocks.shape == (2, 5)
    batch = block_collate(list(blocks))
    assert torch.equal(batch["inputs"]["input_ids"].flatten(), stream[:8])
    assert torch.equal(batch["labels"].flatten(), stream[1:9])


def test_unigram_baseline_of_uniform_tokens_is_the_vocabulary():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randint(0, 16, (200, 65), generator=g), torch.randint(0, 16, (50, 65), generator=g)
    assert unigram_perplexity(train, test, 16) == pytest.approx(16, rel=0.02)


def test_tokenisation_is_cached_per_corpus_tokenizer_and_block_size(tmp_path):
    docs = [f"def f{i}(x):\n    return x * {i}\n" * 20 for i in range(12)]
    kw = dict(val_fraction=0.2, test_fraction=0.2, split_seed=0, corpus_id="t", cache_dir=str(tmp_path))
    first = pack_corpus(docs, tokenizer="bpe:300", block_size=16, **kw)
    again = pack_corpus(docs, tokenizer="bpe:300", block_size=16, **kw)
    other = pack_corpus(docs, tokenizer="bpe:300", block_size=8, **kw)
    assert not first.cached and again.cached and not other.cached
    assert again.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert all(torch.equal(first.splits[s], again.splits[s]) for s in ("train", "val", "test"))
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 1  # the BPE was trained once
    byte = pack_corpus(docs, tokenizer="byte", block_size=16, **kw)
    assert byte.tokenizer.vocab_size == 258 and int(byte.splits["train"].max()) < 258


def _tiny_lm_data():
    from greenstack.data.lm import BlockDataset

    g = torch.Generator().manual_seed(0)
    pattern = torch.arange(10).repeat(40)  # a learnable sequence: next token = previous + 1 (mod 10)
    blocks = pack_blocks([pattern.tolist()] * 4, block_size=16, eos_id=10)
    order = torch.randperm(blocks.shape[0], generator=g)
    train = torch.utils.data.DataLoader(BlockDataset(blocks[order[:80]]), batch_size=8, shuffle=True,
                                        collate_fn=block_collate, generator=torch.Generator().manual_seed(0))
    val = torch.utils.data.DataLoader(BlockDataset(blocks[order[80:]]), batch_size=8, collate_fn=block_collate)
    return train, val


def test_causal_lm_trainer_counts_tokens_and_reports_perplexity():
    from greenstack.models import build_causal_lm

    torch.manual_seed(0)
    train, val = _tiny_lm_data()
    model = build_causal_lm(11, config={"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2,
                                        "n_positions": 16})
    trainer = Trainer(model, train, Optim(name="adamw", lr=1e-2), TrainerConfig(
        max_duration="20ba", eval_interval="20ba", progress=False, device="cpu", log_interval=5),
        val_loader=val, batch_size=8, task=CausalLM())
    before = trainer.evaluate_split(model, "val")["val/perplexity"]
    state = trainer.fit()
    assert state.tokens_seen == 20 * 8 * 16
    assert trainer.last_eval["val/perplexity"] < before / 3


def _compose(*overrides):
    cfg, problems = compose_with_problems(["tracker=none", *overrides])
    assert cfg is not None and not problems
    return cfg


def test_validate_reports_task_model_and_data_mismatches_at_once():
    problems = validate_config(_compose("task=causal_lm", "data=digits", "model=timm"))
    reasons = {p.key: p.reason for p in problems}
    assert "task=causal_lm" in reasons["data._target_"] and "class labels" in reasons["data._target_"]
    assert "task=causal_lm" in reasons["model._target_"]
    problems = validate_config(_compose("task=classification", "data=digits", "model=gpt2_tiny"))
    assert {p.key for p in problems} == {"model._target_"}
    assert any("text model cannot read image data" in p.reason for p in problems)
    assert any("class labels" in p.reason for p in problems)
    assert [p.key for p in validate_config(_compose("task=regression", "data=digits"))] == ["data._target_"]
    assert validate_config(_compose("recipe=lm_tiny", "compression=distill")) == []  # next-token distillation


def test_lm_tiny_recipe_validates_clean():
    assert validate_config(_compose("recipe=lm_tiny")) == []
    assert validate_config(_compose("recipe=lm_tiny", "data.tokenizer=bpe:12")) != []


def test_efficiency_probes_use_the_loss_of_the_batch_shape():
    from greenstack.efficiency.probe import probe_loss

    torch.manual_seed(0)
    lm = {"labels": torch.tensor([[1, 2, -100]])}
    logits = torch.randn(1, 3, 5)
    assert torch.equal(probe_loss(logits, lm), CausalLM().loss(logits, lm))
    cls = {"labels": torch.tensor([1, 0])}
    assert torch.equal(probe_loss(logits[0, :2], cls), F.cross_entropy(logits[0, :2], cls["labels"]))
    reg = {"labels": torch.tensor([0.5, 1.0])}
    assert torch.equal(probe_loss(torch.ones(2, 1), reg), Regression().loss(torch.ones(2, 1), reg))


def test_tail_split_holds_out_the_end_of_every_document(tmp_path):
    docs = ["a" * 80 + "b" * 10 + "c" * 10, "d" * 80 + "e" * 10 + "f" * 10]
    corpus = pack_corpus(docs, tokenizer="byte", block_size=4, val_fraction=0.1, test_fraction=0.1, split_seed=0,
                         corpus_id="tail", cache_dir=str(tmp_path), split_by="tail")
    as_text = {k: {chr(i) for i in v.flatten().tolist() if i < 256} for k, v in corpus.splits.items()}
    assert as_text["train"] >= {"a", "d"} and not as_text["train"] & {"b", "c", "e", "f"}
    assert {"b", "e"} <= as_text["val"] and {"c", "f"} <= as_text["test"]
