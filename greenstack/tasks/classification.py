"""Classification: cross-entropy on one label per sample; accuracy and loss when evaluating."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from greenstack.tasks.base import Target, Task


class _ClassificationEval:
    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), device=device, dtype=torch.long)
        self.count = 0

    def update(self, outputs: torch.Tensor, batch: dict[str, Any]) -> None:
        labels = batch["labels"]
        self.loss_sum += F.cross_entropy(outputs.float(), labels, reduction="sum")
        self.correct += (outputs.argmax(-1) == labels).sum()
        self.count += labels.numel()

    def compute(self, prefix: str) -> dict[str, float]:
        if self.count == 0:
            return {}
        return {f"{prefix}/loss": self.loss_sum.item() / self.count, f"{prefix}/accuracy": self.correct.item() / self.count,
                f"{prefix}/samples": self.count}


class Classification(Task):
    """One class label per sample (images, texts): the loop's behaviour before tasks existed."""

    name: ClassVar[str] = "classification"
    target: ClassVar[Target] = "class"
    report: ClassVar[dict[str, str]] = {"val/accuracy": "fraction", "test/accuracy": "fraction", "test/loss": "nats"}
    default_loss = staticmethod(F.cross_entropy)

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.criterion(outputs.float(), batch["labels"])

    def evaluator(self, device: torch.device) -> _ClassificationEval:
        return _ClassificationEval(device)
