"""trainer.deterministic: the torch switches, their restoration, warn-mode op reports, seeded loaders."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from greenstack.engine.determinism import CUBLAS_ENV, Determinism, check_mode, seed_loaders, seed_worker


def _torch_warning(op: str) -> None:
    """What torch's TORCH_WARN emits for an op without a deterministic kernel under warn_only (CUDA ops
    only; no CPU op warns, so the CPU test sends the same message)."""
    warnings.warn(f"{op} does not have a deterministic implementation, but you set "
                  "'torch.use_deterministic_algorithms(True, warn_only=True)'. You can file an issue at "
                  "https://github.com/pytorch/pytorch/issues", UserWarning, stacklevel=2)


@pytest.fixture
def clean_switches():
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[2], before[3]


def test_true_sets_every_switch_and_restores_them_after_the_run(clean_switches, monkeypatch):
    monkeypatch.delenv(CUBLAS_ENV, raising=False)
    torch.backends.cudnn.benchmark = True
    with Determinism(True).applied():
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ[CUBLAS_ENV] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark


def test_false_changes_nothing(clean_switches):
    torch.backends.cudnn.benchmark = True
    with Determinism(False).applied() as d:
        assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert d.summary()["trainer/deterministic"].value == 0


def test_warn_lists_each_non_deterministic_op_once_with_its_count_and_passes_other_warnings(clean_switches):
    d = Determinism("warn")
    with d.applied():
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        for _ in range(3):
            _torch_warning("scatter_add_cuda_kernel")
        _torch_warning("index_add_cuda_")
        with pytest.warns(UserWarning, match="unrelated"):
            warnings.warn("unrelated", UserWarning, stacklevel=1)
    assert d.nondeterministic_ops == {"scatter_add_cuda_kernel": 3, "index_add_cuda_": 1}
    figures = d.summary()
    assert figures["trainer/deterministic"].value == 1
    ops = figures["trainer/nondeterministic_ops"]
    assert ops.value == 2 and "scatter_add_cuda_kernel ×3" in ops.source and "index_add_cuda_ ×1" in ops.source
    assert not torch.are_deterministic_algorithms_enabled()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: every CPU kernel torch has is deterministic")
def test_warn_names_a_real_cuda_op_and_true_refuses_it(clean_switches):
    d = Determinism("warn")
    with d.applied():
        torch.histc(torch.randn(100, device="cuda"))
    assert any("histc" in op for op in d.nondeterministic_ops), d.nondeterministic_ops
    with Determinism(True).applied(), pytest.raises(RuntimeError, match="deterministic"):
        torch.histc(torch.randn(100, device="cuda"))


@pytest.mark.parametrize(("value", "ok"), [(False, True), (True, True), ("warn", True), ("true", False), (1, False)])
def test_only_false_true_and_warn_are_modes(value, ok):
    assert (check_mode(value) is None) == ok


def test_seeded_loaders_repeat_their_order_whatever_the_global_rng_did():
    data = TensorDataset(torch.arange(32))

    def order(noise: int) -> list[int]:
        loaders = [DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=8)]
        assert seed_loaders(loaders, seed=7) == 2
        assert loaders[0].worker_init_fn is seed_worker
        torch.manual_seed(noise)  # what other code does to the global RNG between runs
        return [int(x) for (batch,) in loaders[0] for x in batch]

    assert order(1) == order(2)
