"""The task interface the loop calls: outputs, loss, counts, and an evaluation accumulator."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar, Literal, Protocol

import torch

#: what a data set's labels are, and so which task can learn from it
Target = Literal["class", "value", "next_token"]


def model_outputs(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """Logits for a batch `{"inputs": tensor | dict, "labels": tensor}` from timm or transformers models."""
    inputs = batch["inputs"]
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.logits if hasattr(out, "logits") else out


#: the one forward pass of every caller outside a task (probes, latency timing, distillation teachers)
forward = model_outputs


def has_improved(current: float, best: float, *, mode: Literal["min", "max"], min_delta: float) -> bool:
    """Whether metric value `current` beats `best` by more than `min_delta` in the direction `mode`
    (shared by early stopping and the efficiency alerts)."""
    if math.isnan(best):
        return True
    return current < best - min_delta if mode == "min" else current > best + min_delta


class Evaluator(Protocol):
    """Accumulates one evaluation pass on the device (no host syncs) and reports it at the end."""

    def update(self, outputs: torch.Tensor, batch: dict[str, Any]) -> None: ...

    def compute(self, prefix: str) -> dict[str, float]:
        """`{"<prefix>/<metric>": value}`, empty when nothing was seen."""
        ...


class Task:
    """Base task. Subclasses set `target` and `report` and implement `loss` and `evaluator`.

    `target` is the kind of label the task learns (checked against the data and model by
    `greenstack validate`); `report` maps the evaluation figures written to sustainability.json to
    their units.
    """

    name: ClassVar[str] = "task"
    target: ClassVar[Target] = "class"
    report: ClassVar[dict[str, str]] = {}
    #: the training loss when the config gives none (`task.loss`: a `_target_` component, `_partial_: true`)
    default_loss: ClassVar[Callable[..., torch.Tensor] | None] = None

    def __init__(self, loss: Callable[..., torch.Tensor] | None = None) -> None:
        self.criterion = loss if loss is not None else type(self).default_loss

    def outputs(self, model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        """Model outputs for a batch already on the device."""
        return model_outputs(model, batch)

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        raise NotImplementedError

    def samples(self, batch: dict[str, Any]) -> int:
        """Samples in a batch (shape only: no sync)."""
        return int(batch["labels"].shape[0])

    def tokens(self, batch: dict[str, Any]) -> int:
        """Target tokens in a batch, counted on the host batch before it moves to the device; 0 if the
        task has no tokens (then no per-token figures are reported)."""
        return 0

    def evaluator(self, device: torch.device) -> Evaluator:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
