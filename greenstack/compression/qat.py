"""int8 quantization-aware training: choose a backend per model, prepare, freeze, convert.

Two backends behind one set of functions:
- `torchao` (qat_backend_torchao): Linear/Embedding-heavy models (transformers, ViTs, decoders; GPT-2's
  transformers `Conv1D` projections are turned into the equivalent `nn.Linear` first);
- `ao_fx` (qat_backend_ao, torch.ao FX graph mode): CNNs, because torchao's QAT does not convert Conv2d.
`choose_backend` picks by where the model's weights live and says why, so the decision can be logged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from torch import nn
from torch.nn.modules.conv import _ConvNd

from greenstack.compression.selection import is_conv1d
from greenstack.errors import ConfigError, Problem
from greenstack.models.spec import attach_spec, model_spec

Backend = Literal["auto", "torchao", "ao_fx"]
QAT_ATTR = "greenstack_qat"
BACKENDS = ("auto", "torchao", "ao_fx")


def backend_module(name: str) -> ModuleType:
    """The implementation module of a backend by name."""
    if name == "torchao":
        from greenstack.compression import qat_backend_torchao as mod
    elif name == "ao_fx":
        from greenstack.compression import qat_backend_ao as mod
    else:
        raise ValueError(f"unknown QAT backend {name!r}")
    return mod


@dataclass(frozen=True)
class BackendChoice:
    """The backend picked for a model and the reason (logged and reported)."""

    name: str
    reason: str


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def quantizable_layers(model: nn.Module, exclude: Sequence[str] = ()) -> dict[str, str]:
    """`{module name: kind}` of layers int8 QAT can quantize (Conv, Linear incl. transformers `Conv1D`,
    Embedding), minus `exclude` (regexes on module names)."""
    layers: dict[str, str] = {}
    for name, module in model.named_modules():
        if not name or _matches(name, exclude):
            continue
        if isinstance(module, _ConvNd):
            layers[name] = "conv"
        elif isinstance(module, nn.Linear) or is_conv1d(module):
            layers[name] = "linear"
        elif isinstance(module, nn.Embedding):
            layers[name] = "embedding"
    return layers


def excluded_modules(model: nn.Module, exclude: Sequence[str]) -> list[str]:
    """Names of the quantizable layers that `exclude` removes (backends take exact names)."""
    everything = quantizable_layers(model)
    return [name for name in everything if _matches(name, exclude)]


def choose_backend(model: nn.Module, requested: str = "auto", exclude: Sequence[str] = ()) -> BackendChoice:
    """Pick the backend for `model`; ConfigError (key `compression.qat`) when nothing can be quantized
    or the requested backend cannot handle the model."""
    layers = quantizable_layers(model, exclude)
    if not layers:
        key = "compression.qat.exclude" if exclude and quantizable_layers(model) else "compression.qat"
        raise ConfigError(Problem(key, list(exclude) if key.endswith("exclude") else type(model).__name__,
                                  "the model has no quantizable layers (Conv, Linear or Embedding)"
                                  + (" left after `exclude`" if key.endswith("exclude") else ""),
                                  "remove the qat stage for this model" if key == "compression.qat"
                                  else "exclude fewer layers"))
    modules = dict(model.named_modules())
    weights = {"conv": 0, "linear": 0, "embedding": 0}
    for name, kind in layers.items():
        weight = getattr(modules[name], "weight", None)
        weights[kind] += weight.numel() if weight is not None else 0
    total = sum(weights.values()) or 1
    conv_share = weights["conv"] / total
    is_transformers = type(model).__module__.startswith("transformers.")
    if requested == "auto":
        if is_transformers or conv_share < 0.5:
            name = "torchao"
            reason = (f"{'transformers model, ' if is_transformers else ''}"
                      f"{1 - conv_share:.0%} of quantizable weights in Linear/Embedding: torchao quantize_ + QATConfig")
        else:
            name = "ao_fx"
            reason = (f"{conv_share:.0%} of quantizable weights in Conv layers, which torchao QAT does not "
                      f"convert: torch.ao FX graph-mode QAT (x86 int8 kernels)")
    else:
        name, reason = requested, "requested in the config"
    problems: list[Problem] = []
    backend = backend_module(name)
    if not backend.available():
        fix = f"pip install '{backend.REQUIREMENT}'" if name == "torchao" else "use backend: torchao"
        problems.append(Problem("compression.qat.backend", name, f"the {name} backend is not available here", fix))
    elif name == "torchao" and conv_share >= 0.999:
        problems.append(Problem("compression.qat.backend", name, "torchao QAT does not convert Conv layers and "
                                "this model has no Linear/Embedding layers", "use backend: auto or ao_fx"))
    elif name == "ao_fx":
        reason_untraceable = backend.check_traceable(model)
        if reason_untraceable:
            problems.append(Problem("compression.qat.backend", name,
                                    f"FX cannot trace {type(model).__name__}: {reason_untraceable}",
                                    "use backend: torchao (Linear/Embedding only)"))
    if problems:
        raise ConfigError(problems)
    return BackendChoice(name, reason)


def backend_of(model: nn.Module) -> str | None:
    """Which backend prepared `model` (None when it is not QAT-prepared)."""
    for name in ("ao_fx", "torchao"):
        backend = backend_module(name)
        if backend.available() and backend.is_prepared(model):
            return name
    return None


def prepare_qat(model: nn.Module, backend: str, example_inputs: tuple[Any, ...] = (),
                exclude_modules: Sequence[str] = ()) -> nn.Module:
    """A fake-quant copy of `model` for training (the float model is left unchanged).

    The float model's spec travels with the copy (FX graph modules lose the original class), so the
    exporter can still rebuild the architecture.
    """
    try:
        spec = model_spec(model)
    except ConfigError:
        spec = None
    prepared = backend_module(backend).prepare(model, example_inputs, exclude_modules)
    if spec is not None:
        attach_spec(prepared, spec)
    object.__setattr__(prepared, QAT_ATTR, {"backend": backend, "exclude_modules": list(exclude_modules)})
    return prepared


def qat_info(model: nn.Module) -> dict[str, Any]:
    """`{"backend", "exclude_modules"}` recorded by `prepare_qat` (backend detected when absent)."""
    info = getattr(model, QAT_ATTR, None)
    if isinstance(info, dict):
        return dict(info)
    return {"backend": backend_of(model), "exclude_modules": []}


def convert_qat(model: nn.Module, backend: str | None = None, exclude_modules: Sequence[str] = ()) -> nn.Module:
    """The real int8 model (CPU, eval) for a QAT-prepared `model`."""
    backend = backend or backend_of(model)
    if backend is None:
        raise ValueError("model is not QAT-prepared")
    module = backend_module(backend)
    if backend == "torchao":
        return module.convert(model, exclude_modules)
    return module.convert(model)


def freeze_qat(model: nn.Module, backend: str) -> None:
    """Freeze observers / BatchNorm statistics for the final phase of QAT."""
    backend_module(backend).freeze(model)
