"""L2 regularisation of selected weights, as a loss term or as decoupled weight decay.

Shrinking the weights before magnitude pruning concentrates the signal in fewer, larger weights,
so the subsequent pruning removes less information. Unlike the optimizer's `weight_decay`, this
acts only on the selected parameters (by default Conv/Linear kernels: not norms, biases or embeddings).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


def l2_penalty(weights: Iterable[torch.Tensor], coefficient: float) -> torch.Tensor:
    """`coefficient / 2 * sum ||w||^2` over `weights` (a differentiable scalar)."""
    terms = [w.pow(2).sum() for w in weights]
    if not terms:
        return torch.zeros(())
    return 0.5 * coefficient * torch.stack(terms).sum()


@torch.no_grad()
def decay_(weights: Iterable[torch.Tensor], coefficient: float, lr: float) -> None:
    """Decoupled decay `w <- w * (1 - lr * coefficient)` (AdamW-style), applied after an optimizer step."""
    factor = 1.0 - lr * coefficient
    for w in weights:
        w.mul_(factor)
