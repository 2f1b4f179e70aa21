"""Which parameters a compression stage acts on: weight matrices/kernels of Conv and Linear layers,
filtered by regular expressions on their qualified names.

Shared by L2 and pruning so that "the weights" means the same thing in both. QAT-prepared modules
(torch.ao fused ConvBn, torchao FakeQuantizedLinear) subclass the float layers, so a model keeps its
selection, and its parameter names, across `prepare`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.conv import _ConvNd

from greenstack.errors import Problem

#: layer types whose `weight` is a prunable / decayable matrix or kernel
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (_ConvNd, nn.Linear)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2 family): a Linear with its weight stored transposed, (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


@torch.no_grad()
def linearize_conv1d(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` in `model` (in place) by the equivalent `nn.Linear` (weight
    transposed, same bias, same module name), so Linear-only quantizers see GPT-2's projections; the
    outputs are the same up to float rounding. Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not is_conv1d(child):
                continue
            weight = child.weight  # (in_features, out_features)
            linear = nn.Linear(weight.shape[0], weight.shape[1], bias=child.bias is not None,
                               device=weight.device, dtype=weight.dtype)
            linear.weight.copy_(weight.t())
            if child.bias is not None:
                linear.bias.copy_(child.bias)
            linear.train(child.training)
            setattr(parent, child_name, linear)
            replaced += 1
    return replaced


def as_patterns(value: str | Sequence[str] | None) -> list[str]:
    """A single regex or a list of them, as a list."""
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def check_patterns(patterns: str | Sequence[str] | None, key: str) -> list[Problem]:
    """Problems with user-given regular expressions (each one must compile)."""
    problems = []
    for i, pattern in enumerate(as_patterns(patterns)):
        if not isinstance(pattern, str):
            problems.append(Problem(f"{key}[{i}]", pattern, "expected a regular expression string"))
            continue
        try:
            re.compile(pattern)
        except re.error as e:
            problems.append(Problem(f"{key}[{i}]", pattern, f"not a regular expression: {e}"))
    return problems


def select_weights(model: nn.Module, include: str | Sequence[str] | None = None,
                   exclude: str | Sequence[str] | None = None,
                   layer_types: tuple[type[nn.Module], ...] = WEIGHT_LAYERS) -> dict[str, nn.Parameter]:
    """`{qualified name: weight}` of the Conv/Linear layers (and GPT-2's transformers `Conv1D`, whose
    weight is stored (in, out)) whose weight name matches an `include` pattern (all when none given)
    and no `exclude` pattern (`re.search` semantics)."""
    inc = [re.compile(p) for p in as_patterns(include)]
    exc = [re.compile(p) for p in as_patterns(exclude)]
    selected: dict[str, nn.Parameter] = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, layer_types) and not (layer_types is WEIGHT_LAYERS and is_conv1d(module)):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.ndim < 2:
            continue
        name = f"{module_name}.weight" if module_name else "weight"
        if inc and not any(p.search(name) for p in inc):
            continue
        if any(p.search(name) for p in exc):
            continue
        selected[name] = weight
    return selected


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def zero_fraction(tensors: Sequence[torch.Tensor]) -> float:
    """Fraction of exactly-zero elements over several tensors (0.0 for none)."""
    total = sum(t.numel() for t in tensors)
    if not total:
        return 0.0
    zeros = sum(int((t == 0).sum()) for t in tensors)
    return zeros / total
