"""Attention kernels: PyTorch's fused scaled_dot_product_attention (SDPA) vs the eager math.

SDPA dispatches to flash / memory-efficient kernels on GPUs (no L x L attention matrix kept), and
to a fused kernel on CPU. transformers models switch with `set_attn_implementation`; timm attention
modules with their `fused_attn` flag. `nn.MultiheadAttention` already calls SDPA.
"""

from __future__ import annotations

from typing import Literal

import torch

from greenstack.efficiency.checkpointing import Unsupported
from greenstack.efficiency.probe import module_of

AttentionImpl = Literal["sdpa", "eager"]


def _timm_attention(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, "fused_attn") and isinstance(m.fused_attn, bool)]


def _transformers_config(model: torch.nn.Module):  # noqa: ANN202 - transformers PretrainedConfig
    config = getattr(model, "config", None)
    return config if config is not None and hasattr(config, "_attn_implementation") else None


def attention_implementation(model: torch.nn.Module) -> str | None:
    """'sdpa', 'eager' (or another transformers name) for models with attention; None without attention."""
    model = module_of(model)
    config = _transformers_config(model)
    if config is not None:
        return str(config._attn_implementation or "eager")
    timm_attn = _timm_attention(model)
    if timm_attn:
        return "sdpa" if all(m.fused_attn for m in timm_attn) else "eager"
    if any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
        return "sdpa"
    return None


def set_attention_implementation(model: torch.nn.Module, impl: AttentionImpl) -> str:
    """Switch the model's attention to `impl` in place; returns how. Raises `Unsupported`."""
    model = module_of(model)
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"unknown attention implementation {impl!r}")
    config = _transformers_config(model)
    if config is not None:
        if not hasattr(model, "set_attn_implementation"):
            raise Unsupported(f"this transformers version cannot switch {type(model).__name__} after loading; "
                              f"rebuild it with model.attn_implementation={impl}")
        try:
            model.set_attn_implementation(impl)
        except (ValueError, ImportError) as e:
            raise Unsupported(f"{type(model).__name__}: {str(e).splitlines()[0]}") from e
        return f"transformers set_attn_implementation({impl!r})"
    timm_attn = _timm_attention(model)
    if timm_attn:
        for m in timm_attn:
            m.fused_attn = impl == "sdpa"
        return f"timm fused_attn={impl == 'sdpa'} on {len(timm_attn)} attention modules"
    if any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules()):
        raise Unsupported("nn.MultiheadAttention already uses scaled_dot_product_attention")
    raise Unsupported(f"{type(model).__name__} has no attention layers")


def apply_sdpa(model: torch.nn.Module) -> str:
    """Use PyTorch SDPA attention kernels (the plain-function form of the SDPA policy)."""
    return set_attention_implementation(model, "sdpa")
