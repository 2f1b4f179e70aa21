"""Every compression policy, alone and chained, trains 2 batches in the real loop and does its job."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from greenstack.compression import export, pruning, qat
from greenstack.compression.selection import select_weights
from greenstack.engine.determinism import Determinism
from greenstack.policies.compression import (
    Distillation,
    ExportCompressed,
    Int8QAT,
    L2Regularization,
    MagnitudePruning,
)
from tests.helpers.optional import need
from tests.unit.test_compression import fit, image_batches, text_batches, tiny_bert, tiny_cnn

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _check_l2(trainer, policies, run_dir):
    l2 = policies[0]
    weights = select_weights(trainer.state.model)
    assert l2.last_penalty is not None and float(l2.last_penalty) > 0
    # the penalty of the last step was computed on the weights before that step: same order of magnitude
    now = 0.5 * l2.coefficient * sum(float(w.detach().pow(2).sum()) for w in weights.values())
    assert float(l2.last_penalty) == pytest.approx(now, rel=0.2)


def _check_prune(trainer, policies, run_dir):
    assert pruning.sparsity_of(select_weights(trainer.state.model)) == pytest.approx(0.6, abs=1e-4)


def _check_qat_cnn(trainer, policies, run_dir):
    assert qat.backend_of(trainer.state.model) == "ao_fx" and policies[0].prepared_at == 1
    assert policies[0].summary()["compression/qat_backend"].value == "ao_fx"


def _check_qat_bert(trainer, policies, run_dir):
    assert qat.backend_of(trainer.state.model) == "torchao"
    assert any(type(m).__name__ == "FakeQuantizedLinear" for m in trainer.state.model.modules())


def _check_distill(trainer, policies, run_dir):
    summary = policies[0].summary()
    assert policies[0].swapped_at == 1
    assert summary["compression/distill_param_fraction"].value <= 0.3
    assert 0 <= summary["compression/distill_student_accuracy"].value <= 1
    assert isinstance(trainer.state.optimizer.param_groups[0]["params"][0], nn.Parameter)
    assert trainer.state.optimizer.param_groups[0]["params"][0] is next(trainer.state.model.parameters())


def _check_distill_then_qat(trainer, policies, run_dir):
    _check_distill(trainer, policies[:1], run_dir)
    assert qat.backend_of(trainer.state.model) == "torchao"  # QAT prepared the student, not the teacher
    assert policies[0].teacher is not None and qat.backend_of(policies[0].teacher) is None
    # the student's learning-rate scale survives QAT rebuilding the optimizer (constant schedule: 10 x 1e-3)
    assert trainer.state.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2)


def _check_export(trainer, policies, run_dir):
    figures = policies[-1].summary()
    art = run_dir / "compressed"
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["backend"] == "ao_fx" and figures["compression/backend"].value == "ao_fx"
    assert figures["compression/size_ratio"].value > 4  # int8 + 60 % sparse vs fp32 (manifest and biases weigh on a tiny model)
    assert figures["compression/artifact_bytes"].value == export.artifact_bytes(art)
    assert figures["compression/sparsity"].value >= 0.6 - 1e-3
    assert figures["compression/latency_ms"].value > 0 and figures["compression/dense_latency_ms"].value > 0
    for key in ("accuracy_before", "accuracy_after"):
        assert 0 <= figures[f"compression/{key}"].value <= 1
    for fig in figures.values():
        assert fig.provenance == "measured" and fig.source
    reloaded = export.load_compressed(art)
    x = trainer.state.batch["inputs"].cpu()  # an int8 artifact runs on the CPU, wherever it was trained
    assert reloaded(x).shape == (x.shape[0], 4)


CASES = {
    "l2": (tiny_cnn, image_batches, lambda: [L2Regularization(coefficient=1e-3)], _check_l2),
    "prune": (tiny_cnn, image_batches,
              lambda: [MagnitudePruning(final_sparsity=0.6, start="0ba", end="1ba", frequency="1ba")], _check_prune),
    "qat_cnn": (tiny_cnn, image_batches, lambda: [Int8QAT(start="1ba", freeze_at="2ba")], _check_qat_cnn),
    "qat_bert": (tiny_bert, text_batches, lambda: [Int8QAT(start="0ba", exclude=["classifier"])], _check_qat_bert),
    "distill_cnn": (tiny_cnn, image_batches, lambda: [Distillation(start="1ba", size_ratio=0.3)], _check_distill),
    "distill_bert": (tiny_bert, text_batches,
                     lambda: [Distillation(start="1ba", size_ratio=0.3)], _check_distill),
    "distill_then_qat": (tiny_bert, text_batches, lambda: [
        Distillation(start="1ba", size_ratio=0.3, student_lr_scale=10.0), Int8QAT(start="1ba")],
        _check_distill_then_qat),
    "chain_export": (tiny_cnn, image_batches, lambda: [
        L2Regularization(coefficient=1e-4, end="1ba"),
        MagnitudePruning(final_sparsity=0.6, start="0ba", end="1ba", frequency="1ba"),
        Int8QAT(start="1ba", freeze_at="2ba"),
        ExportCompressed(latency_repeats=2)], _check_export),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_policy_trains_two_batches(case, tmp_path):
    build, data, make_policies, check = CASES[case]
    if case in ("qat_bert", "distill_then_qat"):
        need("torchao")
    policies = make_policies()
    trainer = fit(build(), data(2), policies, steps=2, run_dir=str(tmp_path))
    assert trainer.state.step == 2 and torch.isfinite(trainer.state.loss).all()
    check(trainer, policies, tmp_path)


# -- resume --------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_kind, make", [
    ("cnn", lambda: [Int8QAT(start="2ba")]),                        # FX graph with fake-quant modules
    ("bert", lambda: [Int8QAT(start="2ba")]),                       # torchao fake-quant linears
    ("cnn", lambda: [Distillation(size_ratio=0.5, start="2ba")]),   # self-distilled: the teacher is saved
    ("cnn", lambda: [Distillation(size_ratio=0.5, start="1ba"), Int8QAT(start="3ba")]),
])
def test_resume_after_a_structural_change_is_bit_exact(model_kind, make):
    """A snapshot taken after QAT prepared the model or distillation swapped in the student restores
    into a fresh run (the structure rebuilt first), through the on-disk codec, and ends identically."""
    from greenstack.checkpoint.codec import decode, encode
    from tests.helpers.snapshots import SnapshotAt

    if model_kind == "bert":
        need("torchao")
    build, data = (tiny_cnn, image_batches(8)) if model_kind == "cnn" else (tiny_bert, text_batches(8))
    snap = SnapshotAt(step=4)
    with Determinism(True).applied():  # exact on CUDA too (deterministic cuDNN/cuBLAS kernels), as in a real run
        whole = fit(build(0), data, [*make(), snap], steps=6)
        on_disk = decode(encode(snap.snapshot))
        resumed = fit(build(1), data, [*make(), SnapshotAt(restore=on_disk)], steps=6)  # other init: all from disk
    a, b = whole.state.model.state_dict(), resumed.state.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
