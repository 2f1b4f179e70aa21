"""Compression cores: cubic schedule, masks, QAT backends, export/reload, distillation, bad inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from greenstack.compression import distill, export, pruning, qat
from greenstack.compression.selection import select_weights
from greenstack.engine.events import Event
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.engine.policy import Policy
from greenstack.engine.reporter import Reporter
from greenstack.errors import ConfigError
from greenstack.models.spec import build_from_spec
from greenstack.policies.compression import Distillation, Int8QAT, L2Regularization, MagnitudePruning
from tests.helpers.optional import need

#: a resnet10t narrowed to 8..64 channels: the real timm architecture, a few ms per 32-px batch
TINY_CNN = {"builder": "timm", "name": "resnet10t", "num_classes": 4, "in_chans": 3,
            "kwargs": {"channels": [8, 16, 32, 64], "stem_width": 8}}
TINY_BERT = {"builder": "transformers", "config": {"model_type": "bert", "vocab_size": 1000, "hidden_size": 32,
                                                   "num_hidden_layers": 2, "num_attention_heads": 2,
                                                   "intermediate_size": 64, "num_labels": 4}}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_from_spec(TINY_CNN)


def tiny_bert(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_from_spec(TINY_BERT)


def image_batches(n_batches: int = 4, batch: int = 16, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Learnable images: each class has its own mean pattern."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(4, 3, 32, 32, generator=g)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 4, (batch,), generator=g)
        out.append({"inputs": protos[y] + 0.5 * torch.randn(batch, 3, 32, 32, generator=g), "labels": y})
    return out


def text_batches(n_batches: int = 4, batch: int = 8, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        y = torch.randint(0, 4, (batch,), generator=g)
        ids = torch.randint(5, 1000, (batch, 12), generator=g)
        ids[:, 0] = y + 1  # the label is readable from the first token
        out.append({"inputs": {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, "labels": y})
    return out


def fit(model: nn.Module, batches: list, policies: list, *, steps: int = 2, run_dir: str | None = None,
        lr: float = 1e-3) -> Trainer:
    trainer = Trainer(model, batches, Optim(lr=lr, weight_decay=0.05), TrainerConfig(
        max_duration=f"{steps}ba", progress=False, log_interval=1, limit_eval_batches=1),
        val_loader=batches[:1], test_loader=batches[:2], policies=policies, batch_size=len(batches[0]["labels"]),
        run_dir=run_dir)
    trainer.fit()
    return trainer


# -- schedule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("step", [0, 10, 20, 30, 50, 70, 90, 100])
def test_cubic_schedule_matches_zhu_gupta(step):
    s_i, s_f, t0, dt, n = 0.1, 0.9, 10, 10, 9  # end = t0 + n * dt = 100
    got = pruning.cubic_sparsity(step, initial=s_i, final=s_f, start_step=t0, end_step=t0 + n * dt, frequency=dt)
    if step < t0:
        assert got == 0.0
    else:
        expected = s_f + (s_i - s_f) * (1 - (step - t0) / (n * dt)) ** 3
        assert got == pytest.approx(expected)


def test_cubic_schedule_holds_between_pruning_steps_and_after_end():
    kw = {"initial": 0.0, "final": 0.8, "start_step": 0, "end_step": 100, "frequency": 10}
    assert pruning.cubic_sparsity(15, **kw) == pruning.cubic_sparsity(10, **kw) < pruning.cubic_sparsity(20, **kw)
    assert pruning.cubic_sparsity(100, **kw) == pruning.cubic_sparsity(10_000, **kw) == 0.8
    values = [pruning.cubic_sparsity(t, **kw) for t in range(0, 101, 10)]
    assert values == sorted(values)
    deltas = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert deltas == sorted(deltas, reverse=True)  # fast early, slow late
    assert pruning.is_pruning_step(100, start_step=0, end_step=100, frequency=30)


@pytest.mark.parametrize(("scope", "structure"), [("global", "unstructured"), ("layer", "unstructured"),
                                                  ("layer", "channels"), ("global", "channels")])
def test_masks_hit_the_requested_sparsity(scope, structure):
    model = tiny_cnn()
    weights = select_weights(model)
    masks = pruning.compute_masks(weights, 0.6, scope=scope, structure=structure)
    pruning.apply_masks_(weights, masks)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    if structure == "unstructured":
        assert kept == total - round(0.6 * total)
        if scope == "layer":
            for w in weights.values():
                assert (w == 0).float().mean().item() == pytest.approx(0.6, abs=1 / w.numel() + 1e-6)
    else:
        assert 0.36 <= kept / total <= 0.44  # whole channels: close to, not exactly, 40 % kept
        for name, m in masks.items():
            per_channel = m.reshape(m.shape[0], -1)
            assert (per_channel.all(1) | ~per_channel.any(1)).all(), name  # a channel is kept or gone
            assert per_channel.any(1).any(), name  # never a whole layer
    assert pruning.sparsity_of(weights) == pytest.approx(1 - kept / total, abs=1e-3)


class _SparsityProbe(Policy):
    """Records the sparsity of the prunable weights after every optimizer step (runs after pruning)."""

    events = frozenset({Event.STEP_END})

    def __init__(self) -> None:
        super().__init__(name="probe")
        self.seen: list[float] = []

    def __call__(self, event: Event, state, reporter: Reporter) -> None:
        self.seen.append(round(pruning.sparsity_of(select_weights(state.model)), 4))


def test_prune_reaches_final_sparsity_and_keeps_it_through_fine_tuning():
    model = tiny_cnn()
    policy, probe = MagnitudePruning(final_sparsity=0.7, start="1ba", end="3ba", frequency="1ba"), _SparsityProbe()
    trainer = fit(model, image_batches(3), [policy, probe], steps=7, lr=1e-2)  # 4 fine-tuning steps after end
    expected = [0.0] + [round(policy.schedule(t), 4) for t in (1, 2)] + [0.7] * 4
    assert probe.seen == pytest.approx(expected, abs=1e-4)
    weights = select_weights(trainer.state.model)
    for name, w in weights.items():  # the zeros are exactly the masks after AdamW steps with weight decay
        assert torch.equal(w != 0, policy.masks[name]), name
    assert policy.summary()["compression/prune_sparsity"].value == pytest.approx(0.7, abs=1e-4)


def test_masked_gradients_are_zero():
    w = torch.randn(4, 4, requires_grad=True)
    (w * 3).sum().backward()
    mask = torch.rand(4, 4) > 0.5
    pruning.mask_gradients_({"w": w}, {"w": mask})
    assert (w.grad[~mask] == 0).all() and (w.grad[mask] == 3).all()


# -- QAT -------------------------------------------------------------------------------------------
def test_backend_choice_per_model():
    assert qat.choose_backend(tiny_cnn()).name == "ao_fx"
    choice = qat.choose_backend(tiny_bert())
    assert choice.name == "torchao" and "transformers" in choice.reason


def _trained_qat(model: nn.Module, backend: str, batches: list) -> nn.Module:
    inputs = batches[0]["inputs"]
    example = (inputs[:1],) if isinstance(inputs, torch.Tensor) else ()
    prepared = qat.prepare_qat(model, backend, example)
    opt = torch.optim.AdamW(prepared.parameters(), lr=1e-3)
    for batch in batches:
        x = batch["inputs"]
        logits = prepared(x) if isinstance(x, torch.Tensor) else prepared(**x).logits
        F.cross_entropy(logits, batch["labels"]).backward()
        opt.step()
        opt.zero_grad()
    return prepared.eval()


def _logits(model: nn.Module, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(inputs) if isinstance(inputs, torch.Tensor) else model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("kind", ["cnn", "bert"])
def test_converted_int8_model_runs_close_to_fake_quant_and_reloads_exactly(kind, tmp_path):
    if kind == "bert":
        need("torchao")
    batches = image_batches(3) if kind == "cnn" else text_batches(3)
    model = tiny_cnn() if kind == "cnn" else tiny_bert()
    pruning.magnitude_prune_(model, 0.5)
    backend = "ao_fx" if kind == "cnn" else "torchao"
    prepared = _trained_qat(model, backend, batches)
    qat.freeze_qat(prepared, backend)  # observers watch eval forwards too: freeze them, as QAT's freeze_at does
    converted = qat.convert_qat(prepared)
    x = batches[0]["inputs"]
    fake, real = _logits(prepared, x), _logits(converted, x)
    # int8 kernels vs simulated rounding: within a few steps of the output's int8 grid
    levels = real.unique()
    lsb = (levels[1:] - levels[:-1]).min() if levels.numel() > 1 else torch.tensor(1e-6)
    assert (real - fake).abs().max() <= 3 * lsb + 1e-6
    assert (real.argmax(-1) == fake.argmax(-1)).float().mean() >= 0.75
    if kind == "cnn":  # real int8 kernels, not float modules
        assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in converted.modules())
    else:
        assert all(type(m.weight).__name__ == "IntxUnpackedToInt8Tensor"
                   for m in converted.modules() if isinstance(m, nn.Linear))
    manifest = export.export_compressed(prepared, tmp_path / "art", example_batch=batches[0])
    assert manifest["backend"] == backend
    reloaded = export.load_compressed(tmp_path / "art")
    torch.testing.assert_close(_logits(reloaded, x), real, rtol=0, atol=0)
    assert export.artifact_bytes(tmp_path / "art") < export.dense_fp32_bytes(export.dense_reference(tmp_path / "art"))


def test_float_sparse_export_is_small_and_reloads_exactly(tmp_path):
    model = tiny_cnn().eval()
    pruning.magnitude_prune_(model, 0.9)
    export.export_compressed(model, tmp_path / "art")
    reloaded = export.load_compressed(tmp_path / "art")
    x = image_batches(1)[0]["inputs"]
    torch.testing.assert_close(_logits(reloaded, x), _logits(model, x), rtol=0, atol=0)
    dense = export.dense_fp32_bytes(model)
    assert export.artifact_bytes(tmp_path / "art") < 0.3 * dense  # 1 bit + 10 % of 4 bytes per weight


@pytest.mark.parametrize("dtype", [torch.int8, torch.float32])
def test_sparse_packing_round_trips_and_is_compact(dtype):
    t = (torch.randn(64, 33) * 50).to(dtype)
    t[torch.rand(64, 33) < 0.8] = 0
    parts, meta = export.pack_tensor("w", t)
    assert meta["encoding"] == "sparse"
    assert sum(p.numel() * p.element_size() for p in parts.values()) < 0.4 * t.numel() * t.element_size()
    assert torch.equal(export.unpack_tensor("w", meta, parts), t)
    dense = torch.randn(64, 33).to(dtype) + 200
    parts, meta = export.pack_tensor("d", dense)
    assert meta["encoding"] == "dense" and torch.equal(export.unpack_tensor("d", meta, parts), dense)


# -- distillation ----------------------------------------------------------------------------------
def test_distillation_loss_mixes_soft_and_hard_targets():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    ce = F.cross_entropy(s, y)
    kl = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean") * 9
    assert distill.distillation_loss(s, t, y, temperature=3, alpha=0).item() == pytest.approx(ce.item(), rel=1e-5)
    assert distill.distillation_loss(s, t, y, temperature=3, alpha=1).item() == pytest.approx(kl.item(), rel=1e-5)
    assert distill.kd_term(s, s, 3).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["cnn", "bert"])
def test_student_is_within_size_ratio_and_runs(kind):
    teacher = tiny_cnn() if kind == "cnn" else tiny_bert()
    student = distill.build_student(teacher, 0.3)
    assert 0.1 < distill.param_fraction(student, teacher) <= 0.3
    x = image_batches(1)[0]["inputs"] if kind == "cnn" else text_batches(1)[0]["inputs"]
    assert _logits(student, x).shape == _logits(teacher, x).shape


# -- bad inputs: ConfigError naming the key --------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "key"), [
    ({"final_sparsity": 1.0}, "compression.prune.final_sparsity"),
    ({"final_sparsity": -0.1}, "compression.prune.final_sparsity"),
    ({"start": "2ep", "end": "1ep"}, "compression.prune.end"),
    ({"initial_sparsity": 0.9, "final_sparsity": 0.5}, "compression.prune.initial_sparsity"),
    ({"frequency": "often"}, "compression.prune.frequency"),
    ({"include": ["(unclosed"]}, "compression.prune.include[0]"),
])
def test_prune_rejects_bad_arguments_with_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        MagnitudePruning(**kwargs)
    assert key in [p.key for p in err.value.problems]


def test_prune_lists_all_problems_at_once():
    with pytest.raises(ConfigError) as err:
        MagnitudePruning(final_sparsity=1.5, scope="everywhere", start="soon")  # type: ignore[arg-type]
    assert {p.key for p in err.value.problems} == {"compression.prune.final_sparsity", "compression.prune.scope",
                                                   "compression.prune.start"}


def test_end_before_start_in_mixed_units_fails_before_the_first_step():
    policy = MagnitudePruning(start="0.5dur", end="1ba")
    with pytest.raises(ConfigError) as err:
        fit(tiny_cnn(), image_batches(2), [policy], steps=4)
    assert err.value.problems[0].key == "compression.prune.end"


class _NoLayers(nn.Module):
    """Logits straight from the inputs: nothing for int8 QAT to quantize."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, :4] * self.scale


def test_qat_without_quantizable_layers_fails_at_init_before_any_step():
    steps = []
    policy = Int8QAT()
    with pytest.raises(ConfigError) as err:
        trainer = fit(_NoLayers(), image_batches(2), [policy])
        steps.append(trainer.state.step)
    assert err.value.problems[0].key == "compression.qat" and not steps
    with pytest.raises(ConfigError) as err:
        qat.choose_backend(tiny_cnn(), exclude=[".*"])
    assert err.value.problems[0].key == "compression.qat.exclude"


def test_qat_and_l2_reject_bad_arguments_with_key():
    with pytest.raises(ConfigError) as err:
        Int8QAT(backend="tensorrt", freeze_at="later")
    assert {p.key for p in err.value.problems} == {"compression.qat.backend", "compression.qat.freeze_at"}
    with pytest.raises(ConfigError) as err:
        L2Regularization(coefficient=-1, mode="l1")  # type: ignore[arg-type]
    assert {p.key for p in err.value.problems} == {"compression.l2.coefficient", "compression.l2.mode"}


def test_distillation_with_mismatched_label_spaces_fails_at_init(tmp_path):
    from safetensors.torch import save_model

    teacher_spec = {**TINY_CNN, "num_classes": 7}
    teacher = build_from_spec(teacher_spec)
    save_model(teacher, str(tmp_path / "teacher.safetensors"))
    node = {"name": "resnet10t", "kwargs": TINY_CNN["kwargs"]}
    policy = Distillation(teacher=str(tmp_path / "teacher.safetensors"), teacher_model=node)
    model = tiny_cnn()  # 4 classes
    with pytest.raises(ConfigError) as err:
        fit(model, image_batches(2), [policy])
    problem = err.value.problems[0]
    assert problem.key == "compression.distill.teacher" and "7 classes" in problem.reason
    # the same teacher trained on 4 classes is accepted and the run trains the student
    ok = build_from_spec(TINY_CNN)
    save_model(ok, str(tmp_path / "ok.safetensors"))
    trainer = fit(copy.deepcopy(model), image_batches(2),
                  [Distillation(teacher=str(tmp_path / "ok.safetensors"), teacher_model=node)])
    assert trainer.state.step == 2 and trainer.state.model is not model


def test_distillation_rejects_bad_arguments_with_key():
    with pytest.raises(ConfigError) as err:
        Distillation(teacher=None, size_ratio=1.5, alpha=2.0)
    assert {p.key for p in err.value.problems} == {"compression.distill.start", "compression.distill.size_ratio",
                                                   "compression.distill.alpha"}
    with pytest.raises(ConfigError) as err:
        Distillation(teacher="minilm")  # no trained classification head: it would teach noise
    assert err.value.problems[0].key == "compression.distill.teacher"
    with pytest.raises(ConfigError) as err:
        Distillation(teacher="/nonexistent/run")
    assert err.value.problems[0].key == "compression.distill.teacher"
