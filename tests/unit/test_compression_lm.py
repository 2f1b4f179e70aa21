"""Compression on decoders (task=causal_lm): int8 QAT of GPT-2 (transformers Conv1D) and Llama-style
models, tied embeddings stored once, and distillation into a smaller decoder."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from greenstack.compression import export, qat
from greenstack.compression.selection import is_conv1d, linearize_conv1d
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.models import build_causal_lm
from greenstack.models.spec import build_from_spec, model_spec
from greenstack.tasks import CausalLM
from tests.helpers.hooks import fire
from tests.helpers.optional import need

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 32
GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 16}
LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 16,
         "tie_word_embeddings": False}


def decoder(config: dict, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_causal_lm(VOCAB, config=dict(config))


def lm_batches(n: int = 4, batch: int = 4, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Learnable sequences (next token = previous + 1 mod 10), the last target of each row padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = torch.randint(0, 10, (batch, 1), generator=g)
        ids = (start + torch.arange(length + 1)) % 10
        labels = ids[:, 1:].clone()
        labels[:, -1] = -100
        out.append({"inputs": ids[:, :-1].contiguous(), "labels": labels})
    return out


def fit_lm(model: nn.Module, policies: list, steps: int = 2, lr: float = 3e-3, run_dir: str | None = None) -> Trainer:
    batches = lm_batches()
    trainer = Trainer(model, batches, Optim(lr=lr), TrainerConfig(
        max_duration=f"{steps}ba", progress=False, log_interval=1, limit_eval_batches=1),
        val_loader=batches[:1], test_loader=batches[:2], policies=policies, batch_size=4, task=CausalLM(),
        run_dir=run_dir)
    trainer.fit()
    return trainer


# -- QAT on decoders -----------------------------------------------------------------------------
def test_conv1d_becomes_an_equivalent_linear():
    model = decoder(GPT2).eval()
    assert sum(is_conv1d(m) for m in model.modules()) == 8  # c_attn, c_proj, c_fc, mlp.c_proj x 2 layers
    linear = copy.deepcopy(model)
    assert linearize_conv1d(linear) == 8
    assert not any(is_conv1d(m) for m in linear.modules())
    c_attn = linear.transformer.h[0].attn.c_attn
    assert isinstance(c_attn, nn.Linear) and c_attn.weight.shape == (96, 32)  # (out, in): transposed
    x = torch.randint(0, VOCAB, (2, 10))
    torch.testing.assert_close(linear(x).logits, model(x).logits, rtol=1e-5, atol=1e-6)
    # every projection is quantizable (before: only the embeddings and the LM head)
    kinds = qat.quantizable_layers(model)
    assert kinds["transformer.h.0.attn.c_attn"] == "linear" and kinds["transformer.wte"] == "embedding"


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_decoder_qat_quantizes_every_projection_and_embedding_and_reloads_exactly(config, tmp_path):
    need("torchao")
    from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear

    model = decoder(config)
    assert model_spec(model)["head"] == "causal_lm"
    assert qat.choose_backend(model).name == "torchao"
    prepared = qat.prepare_qat(model, "torchao")
    fake_linear = [n for n, m in prepared.named_modules() if isinstance(m, FakeQuantizedLinear)]
    fake_embedding = [n for n, m in prepared.named_modules() if isinstance(m, FakeQuantizedEmbedding)]
    n_linear = 2 * (4 if config is GPT2 else 7) + 1  # per layer: GPT-2 4 projections, Llama q,k,v,o,gate,up,down
    assert len(fake_linear) == n_linear and "lm_head" in fake_linear
    assert "transformer.wte" in fake_embedding or "model.embed_tokens" in fake_embedding
    # one training step through the fake-quant model
    batch = lm_batches(1)[0]
    CausalLM().loss(prepared(batch["inputs"]).logits, batch).backward()
    manifest = export.export_compressed(prepared, tmp_path)
    reloaded = export.load_compressed(tmp_path)
    converted = qat.convert_qat(prepared, "torchao")
    x = batch["inputs"]
    assert torch.equal(reloaded(x).logits, converted(x).logits)
    assert type(reloaded).__name__ == type(model).__name__  # rebuilt as a causal LM, not a classifier
    dense = export.dense_fp32_bytes(export.dense_reference(tmp_path))
    params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters counted once
    assert dense == pytest.approx(4 * params, rel=0.1)
    # int8 weights + per-row scales: well under half of fp32 (the tiny model's LayerNorms stay float)
    assert export.artifact_bytes(tmp_path) < 0.45 * dense
    if config is GPT2:  # tied input embedding / LM head: stored once
        assert manifest["aliases"]["lm_head.weight.__qdata"] == "transformer.wte.weight.__qdata"
    else:
        assert manifest["aliases"] == {}


def test_tied_float_decoder_export_stores_the_embedding_once(tmp_path):
    model = decoder(GPT2)
    manifest = export.export_compressed(model, tmp_path)
    assert manifest["aliases"] == {"lm_head.weight": "transformer.wte.weight"}
    reloaded = export.load_compressed(tmp_path)
    x = torch.randint(0, VOCAB, (2, 8))
    assert torch.equal(reloaded(x).logits, model.eval()(x).logits)
    size = export.artifact_bytes(tmp_path)
    assert size == pytest.approx(export.dense_fp32_bytes(model), rel=0.05)


def test_llama_tiny_model_config_builds_a_llama_decoder():
    from greenstack.compose import compose_with_problems
    from greenstack.validate import validate_config

    cfg, problems = compose_with_problems(["recipe=lm_tiny", "model=llama_tiny", "compression=qat", "tracker=none"])
    assert cfg is not None and not problems and validate_config(cfg) == []
    assert cfg.model.config.model_type == "llama"
    spec = {"builder": "transformers", "head": "causal_lm",
            "config": {**dict(cfg.model.config), "vocab_size": VOCAB, "num_hidden_layers": 1}}
    model = build_from_spec(spec, device="meta")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not any(is_conv1d(m) for m in model.modules())


def test_qat_policy_trains_a_gpt2_decoder_and_exports_int8(tmp_path):
    need("torchao")
    from greenstack.policies.compression import ExportCompressed, Int8QAT

    trainer = fit_lm(decoder(GPT2), [Int8QAT(start=1), ExportCompressed(latency_repeats=1)], run_dir=str(tmp_path))
    figures = {k: f.value for p in trainer.policies for k, f in p.summary().items()}
    assert figures["compression/qat_backend"] == "torchao"
    assert figures["compression/backend"] == "torchao"
    assert figures["compression/size_ratio"] > 2.2
    assert figures["compression/perplexity_after"] == pytest.approx(figures["compression/perplexity_before"],
                                                                    rel=0.05)
    assert not any(is_conv1d(m) for m in trainer.state.model.modules())


# -- distillation into a smaller decoder -----------------------------------------------------------
def test_lm_kd_term_ignores_padding_and_is_zero_for_equal_distributions():
    from greenstack.compression.distill import lm_kd_term

    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 7)
    labels = torch.tensor([[1, 2, 3, -100, -100], [4, 5, 6, 0, -100]])
    assert float(lm_kd_term(teacher.clone(), teacher, labels, 2.0)) == pytest.approx(0.0, abs=1e-6)
    student = torch.randn(2, 5, 7)
    changed = student.clone()
    changed[labels == -100] = 100.0  # what the model says at padded positions teaches nothing
    kd = lm_kd_term(student, teacher, labels, 2.0)
    assert float(kd) > 0 and torch.equal(kd, lm_kd_term(changed, teacher, labels, 2.0))
    # per-token mean of T^2 * KL over the 5 positions with a target
    mask = labels != -100
    p_t = torch.log_softmax(teacher[mask] / 2, -1)
    p_s = torch.log_softmax(student[mask] / 2, -1)
    expected = 4 * (p_t.exp() * (p_t - p_s)).sum(-1).mean()
    assert float(kd) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("config", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_decoder_student_is_the_same_family_smaller_and_starts_from_the_teacher(config):
    from greenstack.compression.distill import build_student, param_fraction, plan_student

    teacher = decoder({**config, **({"n_layer": 4} if config is GPT2 else {"num_hidden_layers": 4})})
    spec, n_student, n_teacher = plan_student(teacher, 0.6)
    assert spec["head"] == "causal_lm" and n_student <= 0.6 * n_teacher
    student = build_student(teacher, 0.6)
    assert type(student) is type(teacher) and param_fraction(student, teacher) <= 0.6
    assert student.config.vocab_size == teacher.config.vocab_size
    assert student.config.num_hidden_layers < 4 or student.config.hidden_size < 32
    x = torch.randint(0, VOCAB, (2, 8))
    assert student(x).logits.shape == teacher(x).logits.shape
    if student.config.hidden_size == teacher.config.hidden_size:  # layers copied: the first one is the teacher's
        s_emb, t_emb = student.get_input_embeddings().weight, teacher.get_input_embeddings().weight
        assert torch.equal(s_emb, t_emb)


def test_distillation_policy_trains_a_smaller_decoder_on_next_token_distributions():
    from greenstack.policies.compression import Distillation

    teacher = decoder({**GPT2, "n_layer": 4})
    distill = Distillation(teacher=None, size_ratio=0.6, start=2, temperature=2.0, alpha=0.5)
    trainer = fit_lm(teacher, [distill], steps=4)
    assert distill.swapped_at == 2 and distill.teacher is not None
    assert type(trainer.state.model).__name__ == "GPT2LMHeadModel"
    student = trainer.state.model.config
    assert student.n_layer < 4 or student.n_embd < 32
    figures = {k: f.value for k, f in distill.summary().items()}
    assert figures["compression/distill_param_fraction"] <= 0.6
    assert figures["compression/distill_teacher_perplexity"] > 1 and figures["compression/distill_student_perplexity"] > 1
    # the loss trained on is alpha * soft + (1 - alpha) * next-token cross-entropy
    batch = {k: v.to(trainer.state.device) for k, v in lm_batches(1)[0].items()}
    with torch.no_grad():
        logits = trainer.state.model(batch["inputs"]).logits
        teacher_logits = distill.teacher(batch["inputs"]).logits
    from greenstack.compression.distill import lm_kd_term

    trainer.state.batch, trainer.state.outputs = batch, logits
    trainer.state.loss = hard = CausalLM().loss(logits, batch)
    from greenstack.engine.events import Event

    fire(distill, Event.AFTER_FORWARD, trainer.state)
    expected = 0.5 * lm_kd_term(logits, teacher_logits, batch["labels"], 2.0) + 0.5 * hard
    assert float(trainer.state.loss) == pytest.approx(float(expected), rel=1e-5)


def test_validate_accepts_lm_distillation_and_says_why_not_for_regression():
    from greenstack.compose import compose_with_problems
    from greenstack.validate import validate_config

    cfg, problems = compose_with_problems(["recipe=lm_tiny", "compression=distill_qat", "tracker=none"])
    assert cfg is not None and not problems and validate_config(cfg) == []
    cfg, _ = compose_with_problems(["task=regression", "data=hf_local", "data.path=x.csv", "data.label_column=y",
                                    "data.label_kind=value", "model=bert_tiny", "compression=distill", "tracker=none"])
    problems = [p for p in validate_config(cfg) if p.key == "compression.distill"]
    assert len(problems) == 1 and "task=regression predicts a single value" in problems[0].reason


def test_a_finished_lm_run_directory_teaches_a_smaller_decoder(tmp_path):
    from greenstack.compression.distill import load_teacher
    from greenstack.policies.compression import Distillation
    from greenstack.report.summary import save_weights

    teacher = decoder({**GPT2, "n_layer": 3}, seed=1)
    save_weights(teacher, tmp_path / "model.safetensors")  # a tied LM head is saved once
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "model:\n  _target_: greenstack.models.build_causal_lm\n  path: null\n  config:\n"
        + "".join(f"    {k}: {v}\n" for k, v in {**GPT2, "n_layer": 3}.items()))
    loaded = load_teacher(str(tmp_path), num_classes=VOCAB)
    x = torch.randint(0, VOCAB, (2, 8))
    assert torch.equal(loaded(x).logits, teacher.eval()(x).logits)
    distill = Distillation(teacher=str(tmp_path), size_ratio=0.5)
    fit_lm(decoder(GPT2), [distill])
    assert distill.swapped_at == 0 and distill.student_params <= 0.5 * distill.teacher_params


def test_pruning_then_qat_on_gpt2_keeps_the_sparsity_through_the_conv1d_to_linear_swap(tmp_path):
    need("torchao")
    from greenstack.compression.pruning import sparsity_of
    from greenstack.compression.selection import select_weights
    from greenstack.policies.compression import ExportCompressed, Int8QAT, MagnitudePruning

    model = decoder(GPT2)
    assert "transformer.h.0.attn.c_attn.weight" in select_weights(model)  # Conv1D weights are prunable
    prune = MagnitudePruning(final_sparsity=0.5, start=0, end=1, frequency=1)
    trainer = fit_lm(model, [prune, Int8QAT(start=2), ExportCompressed(latency_repeats=1)], steps=4,
                     run_dir=str(tmp_path))
    weights = select_weights(trainer.state.model)
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (96, 32)  # now a Linear
    assert sparsity_of(weights) == pytest.approx(0.5, abs=1e-3)
    figures = {k: f.value for p in trainer.policies for k, f in p.summary().items()}
    assert figures["compression/sparsity"] >= 0.5 - 1e-3


def test_channel_pruning_of_gpt2_conv1d_is_refused_with_the_reason():
    from greenstack.errors import ConfigError
    from greenstack.policies.compression import MagnitudePruning

    with pytest.raises(ConfigError) as e:
        fit_lm(decoder(GPT2), [MagnitudePruning(final_sparsity=0.5, structure="channels", start=0, end=1)])
    assert e.value.problems[0].key == "compression.prune.structure" and "Conv1D" in e.value.problems[0].reason
    from greenstack.compose import compose_with_problems
    from greenstack.validate import validate_config

    cfg, _ = compose_with_problems(["recipe=lm_tiny", "compression=prune", "compression.prune.structure=channels",
                                    "tracker=none"])
    assert [p.key for p in validate_config(cfg)] == ["compression.prune.structure"]
    cfg, _ = compose_with_problems(["recipe=lm_tiny", "model=llama_tiny", "compression=prune",
                                    "compression.prune.structure=channels", "tracker=none"])
    assert validate_config(cfg) == []
