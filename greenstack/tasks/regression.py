"""Regression: mean squared error on one value per sample; MSE and MAE when evaluating."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from greenstack.tasks.base import Target, Task


def _values(outputs: torch.Tensor) -> torch.Tensor:
    """(B, 1) head outputs as (B,) predictions."""
    return outputs.squeeze(-1) if outputs.ndim > 1 and outputs.shape[-1] == 1 else outputs


class _RegressionEval:
    def __init__(self, device: torch.device) -> None:
        self.squared = torch.zeros((), device=device, dtype=torch.float64)
        self.absolute = torch.zeros((), device=device, dtype=torch.float64)
        self.count = 0

    def update(self, outputs: torch.Tensor, batch: dict[str, Any]) -> None:
        error = _values(outputs).double() - batch["labels"].double()
        self.squared += error.square().sum()
        self.absolute += error.abs().sum()
        self.count += batch["labels"].numel()

    def compute(self, prefix: str) -> dict[str, float]:
        if self.count == 0:
            return {}
        mse = self.squared.item() / self.count
        return {f"{prefix}/loss": mse, f"{prefix}/mse": mse, f"{prefix}/mae": self.absolute.item() / self.count,
                f"{prefix}/samples": self.count}


class Regression(Task):
    """One real value per sample (the model has a single output): MSE loss, MSE and MAE reported."""

    name: ClassVar[str] = "regression"
    target: ClassVar[Target] = "value"
    report: ClassVar[dict[str, str]] = {"val/mse": "label unit^2", "test/mse": "label unit^2",
                                        "val/mae": "label unit", "test/mae": "label unit", "test/loss": "label unit^2"}

    default_loss = staticmethod(F.mse_loss)

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.criterion(_values(outputs).float(), batch["labels"].float())

    def evaluator(self, device: torch.device) -> _RegressionEval:
        return _RegressionEval(device)
