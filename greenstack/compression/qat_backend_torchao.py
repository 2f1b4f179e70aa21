"""int8 QAT for Linear/Embedding-heavy models (transformers, ViTs) through torchao.

`quantize_(model, QATConfig(base, step="prepare"))` swaps Linear/Embedding for fake-quantized twins
that train with the int8 rounding in the loop; `step="convert"` turns them into int8 weight tensors
(`IntxUnpackedToInt8Tensor`: qdata + per-row scale). Linear layers get int8 dynamic activations with
int8 per-channel weights, embeddings int8 per-row weights. torchao does not convert Conv2d, which is
why CNNs go through `qat_backend_ao`. GPT-2's transformers `Conv1D` layers are replaced by equivalent
`nn.Linear` before preparing (`selection.linearize_conv1d`); a tied input embedding / LM head stays tied
during QAT and converts to identical int8 tensors, which the artifact stores once.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from greenstack.compression.selection import linearize_conv1d

log = logging.getLogger("greenstack")

NAME = "torchao"
REQUIREMENT = "torchao>=0.18"


def available() -> bool:
    """Whether torchao (with the QATConfig API) imports against this torch."""
    try:
        from torchao.quantization.qat import QATConfig  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchao built for another torch fails in many ways
        return False
    return True


def _configs() -> tuple[Any, Any]:
    from torchao.quantization import Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis

    linear = Int8DynamicActivationIntxWeightConfig(weight_dtype=torch.int8, weight_granularity=PerAxis(0))
    embedding = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0))
    return linear, embedding


def _filter(kind: type[nn.Module], exclude_modules: Sequence[str]) -> Callable[[nn.Module, str], bool]:
    patterns = [re.compile(f"^{re.escape(n)}$") for n in exclude_modules]

    def keep(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, kind) and not any(p.match(fqn) for p in patterns)

    return keep


def _apply(model: nn.Module, step: str, exclude_modules: Sequence[str]) -> None:
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig

    linear, embedding = _configs()
    quantize_(model, QATConfig(linear, step=step), filter_fn=_filter(nn.Linear, exclude_modules))
    quantize_(model, QATConfig(embedding, step=step), filter_fn=_filter(nn.Embedding, exclude_modules))


def prepare(model: nn.Module, example_inputs: tuple[Any, ...] = (), exclude_modules: Sequence[str] = ()
            ) -> nn.Module:
    """A fake-quant (QAT) copy of `model`; the float model is left unchanged."""
    del example_inputs  # module swaps need no tracing
    model = copy.deepcopy(model)
    converted = linearize_conv1d(model)
    if converted:
        log.info("qat: %d transformers Conv1D layers turned into equivalent nn.Linear for int8 QAT", converted)
    _apply(model, "prepare", exclude_modules)
    return model


def is_prepared(model: nn.Module) -> bool:
    """Whether `model` carries torchao's fake-quantized Linear/Embedding modules."""
    try:
        from torchao.quantization.qat import FakeQuantizedEmbedding, FakeQuantizedLinear
    except Exception:  # noqa: BLE001
        return False
    return any(isinstance(m, (FakeQuantizedLinear, FakeQuantizedEmbedding)) for m in model.modules())


def freeze(model: nn.Module) -> None:
    """Nothing to freeze: weight scales follow the weights and activations are quantized per batch."""
    del model


def convert(model: nn.Module, exclude_modules: Sequence[str] = ()) -> nn.Module:
    """int8-weight model from a prepared one (CPU); the prepared model is left unchanged."""
    converted = copy.deepcopy(model).cpu().eval()
    _apply(converted, "convert", exclude_modules)
    return converted


def skeleton(float_model: nn.Module, example_inputs: tuple[Any, ...] = (), exclude_modules: Sequence[str] = ()
             ) -> nn.Module:
    """The converted structure for `float_model` (weights still to be filled by `load_state`)."""
    return convert(prepare(float_model, example_inputs, exclude_modules), exclude_modules)


def _is_subclass_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and type(value) not in (torch.Tensor, nn.Parameter) \
        and hasattr(value, "__tensor_flatten__")


def flatten_state(converted: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain tensors + a JSON description: int8 weight tensors split into their inner tensors."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}
    for key, value in converted.state_dict().items():
        if _is_subclass_tensor(value):
            names, _ = value.__tensor_flatten__()
            for inner in names:
                tensors[f"{key}.__{inner}"] = getattr(value, inner).detach().contiguous()
            layout[key] = {"kind": "subclass", "type": type(value).__name__, "inner": list(names)}
        elif isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous()
            layout[key] = {"kind": "tensor"}
        else:
            raise TypeError(f"cannot serialise {key}: {type(value).__name__}")
    return tensors, layout


@torch.no_grad()
def load_state(converted: nn.Module, tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> nn.Module:
    """Fill a converted skeleton with stored state: int8 inner tensors copied in place, the rest loaded."""
    current = converted.state_dict(keep_vars=True)
    if set(current) != set(layout):
        missing, extra = sorted(set(current) - set(layout)), sorted(set(layout) - set(current))
        raise ValueError(f"artifact does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    plain: dict[str, torch.Tensor] = {}
    for key, entry in layout.items():
        if entry["kind"] == "subclass":
            target = current[key]
            for inner in entry["inner"]:
                getattr(target, inner).copy_(tensors[f"{key}.__{inner}"])
        else:
            plain[key] = tensors[key]
    result = converted.load_state_dict(plain, strict=False)
    unexpected = [k for k in result.unexpected_keys]
    if unexpected:
        raise ValueError(f"artifact has keys the model lacks: {unexpected[:5]}")
    return converted.eval()


def quantized_weights(converted: nn.Module) -> dict[str, torch.Tensor]:
    """`{name: int8 weight}` of the converted model's quantized Linear layers (for sparsity accounting;
    embeddings are quantized too but never pruned, so they are left out)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in converted.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, nn.Linear) and _is_subclass_tensor(weight) and hasattr(weight, "qdata"):
            out[f"{name}.weight"] = weight.qdata
    return out
