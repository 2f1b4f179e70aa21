"""channels_last memory format for CNNs.

NHWC lets cuDNN/oneDNN pick tensor-core / vectorised convolution kernels without layout transposes;
it does nothing useful for attention models (one patch-embedding conv) or models without 4-D inputs.
"""

from __future__ import annotations

from typing import Any

import torch

from greenstack.efficiency.attention import attention_implementation
from greenstack.efficiency.probe import module_of


def conv_layer_count(model: torch.nn.Module) -> int:
    """Number of 2-D convolutions, the layers channels_last speeds up."""
    return sum(isinstance(m, torch.nn.Conv2d) for m in module_of(model).modules())


def is_attention_model(model: torch.nn.Module) -> bool:
    """Attention-based (transformers, timm ViT-style, nn.MultiheadAttention)."""
    return attention_implementation(model) is not None


def apply_channels_last(model: torch.nn.Module) -> int:
    """Convert the model's 4-D parameters and buffers to channels_last in place; returns the conv count."""
    module_of(model).to(memory_format=torch.channels_last)
    return conv_layer_count(model)


def remove_channels_last(model: torch.nn.Module) -> None:
    """Back to the default contiguous (NCHW) format."""
    module_of(model).to(memory_format=torch.contiguous_format)


def channels_last_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The batch with 4-D image inputs in channels_last (other inputs unchanged)."""
    inputs = batch.get("inputs")
    if isinstance(inputs, torch.Tensor) and inputs.ndim == 4:
        return {**batch, "inputs": inputs.contiguous(memory_format=torch.channels_last)}
    return batch


def has_image_inputs(batch: Any) -> bool:
    return isinstance(batch, dict) and isinstance(batch.get("inputs"), torch.Tensor) and batch["inputs"].ndim == 4
