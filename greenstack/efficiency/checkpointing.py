"""Activation checkpointing: keep fewer activations, recompute them in backward (memory for time).

Uses the model's own switch where it has one (timm `set_grad_checkpointing`, transformers
`activation_checkpointing_enable`/`gradient_checkpointing_enable`) and otherwise wraps the repeated
blocks of a plain module with non-reentrant `torch.utils.checkpoint` (`use_reentrant=False`: works
with kwargs, frozen inputs and nested autograd, and is the variant PyTorch recommends). Parameter
names never change, so state dicts and checkpoints stay loadable.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from greenstack.efficiency.probe import module_of

#: attribute names under which plain models keep their repeated blocks
BLOCK_ATTRIBUTES = ("blocks", "layers", "layer", "h", "stages")


class Unsupported(Exception):
    """The model offers no way to apply this optimisation; the message says why."""


class _CheckpointedForward:
    """Replaces a block's `forward` (instance attribute) with a checkpointed call of the class forward."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        inner = type(module).forward
        if module.training and torch.is_grad_enabled():
            return checkpoint(inner, module, *args, use_reentrant=False, **kwargs)
        return inner(module, *args, **kwargs)


def _plain_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    containers: list[torch.nn.Module] = [model] if isinstance(model, torch.nn.Sequential) else []
    containers += [getattr(model, a) for a in BLOCK_ATTRIBUTES
                   if isinstance(getattr(model, a, None), (torch.nn.ModuleList, torch.nn.Sequential))]
    for container in containers:
        blocks = [b for b in container.children() if any(True for _ in b.parameters())]
        if len(blocks) >= 2:
            return blocks
    return []


def _is_transformers(model: torch.nn.Module) -> bool:
    return hasattr(model, "supports_gradient_checkpointing") and hasattr(model, "config")


def checkpointing_support(model: torch.nn.Module) -> str | None:
    """How activation checkpointing would be applied: "timm", "transformers", "blocks", or None."""
    model = module_of(model)
    if _is_transformers(model):
        return "transformers" if model.supports_gradient_checkpointing else None
    if hasattr(model, "set_grad_checkpointing") and hasattr(model, "default_cfg"):
        return "timm"
    return "blocks" if _plain_blocks(model) else None


def is_activation_checkpointing(model: torch.nn.Module) -> bool:
    """Whether checkpointing is currently on (by any of the three mechanisms)."""
    model = module_of(model)
    if _is_transformers(model):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            flag = getattr(model, "is_activation_checkpointing", None)
            if flag is None:
                flag = getattr(model, "is_gradient_checkpointing", False)
        return bool(flag)
    if getattr(model, "grad_checkpointing", False):
        return True
    return any(isinstance(m.__dict__.get("forward"), _CheckpointedForward) for m in model.modules())


def apply_activation_checkpointing(model: torch.nn.Module) -> str:
    """Turn activation checkpointing on (idempotent); returns the mechanism used.

    Raises `Unsupported` for models with neither a switch nor repeated blocks.
    """
    model = module_of(model)
    kind = checkpointing_support(model)
    if kind == "transformers":
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return "transformers activation_checkpointing_enable(use_reentrant=False)"
    if kind == "timm":
        try:
            model.set_grad_checkpointing(True)
            return "timm set_grad_checkpointing"
        except (AssertionError, NotImplementedError, TypeError):
            if not _plain_blocks(model):
                raise Unsupported(f"{type(model).__name__} refuses timm set_grad_checkpointing") from None
    if _is_transformers(model):
        raise Unsupported(f"{type(model).__name__} has supports_gradient_checkpointing=False")
    blocks = _plain_blocks(model)
    if not blocks:
        raise Unsupported(f"{type(model).__name__} has no checkpointing switch (timm set_grad_checkpointing, "
                          f"transformers gradient checkpointing) and no repeated blocks "
                          f"({'/'.join(BLOCK_ATTRIBUTES)} or a Sequential) to wrap")
    for block in blocks:
        if not isinstance(block.__dict__.get("forward"), _CheckpointedForward):
            block.forward = _CheckpointedForward(block)  # type: ignore[method-assign]
    return f"torch.utils.checkpoint(use_reentrant=False) around {len(blocks)} blocks"


def remove_activation_checkpointing(model: torch.nn.Module) -> None:
    """Undo `apply_activation_checkpointing` (whichever mechanism it used)."""
    model = module_of(model)
    if _is_transformers(model):
        if getattr(model, "supports_gradient_checkpointing", False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                if hasattr(model, "activation_checkpointing_disable"):
                    model.activation_checkpointing_disable()
                else:
                    model.gradient_checkpointing_disable()
        return
    if getattr(model, "grad_checkpointing", False) and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(False)
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), _CheckpointedForward):
            del m.forward
