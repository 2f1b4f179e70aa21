"""Causal language modelling: next-token cross-entropy; loss and perplexity per token when evaluating.

Batches carry `labels` already aligned with the inputs: `labels[b, t]` is the token that follows
`input_ids[b, t]`, and `ignore_index` where there is none (padding, the end of a document). The data
builders (`greenstack.data.lm`) pack corpora into blocks of `block_size + 1` tokens so every token
is a target exactly once, with no padding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from greenstack.errors import ConfigError
from greenstack.tasks.base import Target, Task


class _CausalLMEval:
    def __init__(self, device: torch.device, ignore_index: int) -> None:
        self.ignore_index = ignore_index
        self.loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        self.tokens = torch.zeros((), device=device, dtype=torch.long)
        self.sequences = 0

    def update(self, outputs: torch.Tensor, batch: dict[str, Any]) -> None:
        labels = batch["labels"]
        self.loss_sum += F.cross_entropy(outputs.flatten(0, -2).float(), labels.flatten(),
                                         ignore_index=self.ignore_index, reduction="sum").double()
        self.tokens += (labels != self.ignore_index).sum()
        self.sequences += labels.shape[0]

    def compute(self, prefix: str) -> dict[str, float]:
        tokens = int(self.tokens.item())
        if tokens == 0:
            return {}
        loss = self.loss_sum.item() / tokens
        return {f"{prefix}/loss": loss, f"{prefix}/perplexity": math.exp(min(loss, 700.0)),
                f"{prefix}/tokens": tokens, f"{prefix}/samples": self.sequences}


class CausalLM(Task):
    """Next-token prediction for decoders (transformers `AutoModelForCausalLM`)."""

    name: ClassVar[str] = "causal_lm"
    target: ClassVar[Target] = "next_token"
    report: ClassVar[dict[str, str]] = {"val/perplexity": "perplexity", "test/perplexity": "perplexity",
                                        "val/loss": "nats/token", "test/loss": "nats/token"}

    default_loss = staticmethod(F.cross_entropy)

    def __init__(self, ignore_index: int = -100, loss: Callable[..., torch.Tensor] | None = None) -> None:
        super().__init__(loss)
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool) or ignore_index >= 0:
            raise ConfigError("must be a negative integer (token ids are >= 0)", key="task.ignore_index",
                              value=ignore_index, fix="use -100, the PyTorch/transformers convention")
        self.ignore_index = ignore_index

    def loss(self, outputs: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
        return self.criterion(outputs.flatten(0, -2).float(), batch["labels"].flatten(),
                              ignore_index=self.ignore_index)

    def tokens(self, batch: dict[str, Any]) -> int:
        return int((batch["labels"] != self.ignore_index).sum())

    def evaluator(self, device: torch.device) -> _CausalLMEval:
        return _CausalLMEval(device, self.ignore_index)

    def __repr__(self) -> str:
        return f"CausalLM(ignore_index={self.ignore_index})"
