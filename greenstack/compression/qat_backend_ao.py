"""int8 QAT for CNNs through torch.ao.quantization's FX graph mode. The ONLY module that touches it.

`torch.ao.quantization` is deprecated in favour of torchao, but torchao's QAT (`quantize_` +
`QATConfig`) does not convert Conv2d, and its pt2e flow only produces fast int8 CPU kernels after
`torch.compile` lowering. FX graph mode QAT fuses Conv+BN(+ReLU), trains with fake-quant and converts
to real x86/fbgemm int8 kernels that run eagerly on CPU. When torch drops it, replace this module
(same functions) with a torchao pt2e implementation; nothing else imports torch.ao.quantization.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import logging
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

log = logging.getLogger("greenstack")

NAME = "ao_fx"
#: the quantized engine: x86 (fbgemm + onednn heuristics) is the default on x86 CPUs
ENGINE = "x86"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the deprecation banner that every torch.ao.quantization call prints."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*")
        yield


def available() -> bool:
    """Whether this torch still ships FX graph mode quantization with an x86 engine."""
    try:
        with _quiet():
            from torch.ao.quantization.quantize_fx import convert_fx, prepare_qat_fx  # noqa: F401
    except ImportError:
        return False
    return ENGINE in torch.backends.quantized.supported_engines


def check_traceable(model: nn.Module) -> str | None:
    """None when FX can trace `model` (needed to insert fake-quant), else the reason it cannot."""
    try:
        torch.fx.symbolic_trace(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure means this backend cannot be used
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def _qconfig_mapping(exclude_modules: Sequence[str]) -> Any:
    from torch.ao.quantization import get_default_qat_qconfig_mapping

    mapping = get_default_qat_qconfig_mapping(ENGINE)
    for name in exclude_modules:
        mapping.set_module_name(name, None)
    return mapping


@torch.no_grad()
def _nudge_zero_norm_scales(model: nn.Module, floor: float = 1e-3) -> int:
    """Fused Conv+BN QAT divides by the BN scale: a zero gamma (timm's zero-init of the last BN in each
    residual block) turns the whole activation into NaN. Lift |gamma| to `floor`; returns how many."""
    changed = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            small = module.weight.abs() < floor
            if small.any():
                module.weight[small] = torch.where(module.weight[small] < 0, -floor, floor)
                changed += int(small.sum())
    return changed


def prepare(model: nn.Module, example_inputs: tuple[Any, ...], exclude_modules: Sequence[str] = ()) -> nn.Module:
    """A fake-quant (QAT) copy of `model` with Conv+BN(+ReLU) fused; the float model is left unchanged."""
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = copy.deepcopy(model).train()
    nudged = _nudge_zero_norm_scales(model)
    if nudged:
        log.info("qat: lifted %d zero BatchNorm scales to 1e-3 (fused Conv+BN QAT divides by them)", nudged)
    torch.backends.quantized.engine = ENGINE
    with _quiet():
        return prepare_qat_fx(model, _qconfig_mapping(exclude_modules), example_inputs=example_inputs)


def is_prepared(model: nn.Module) -> bool:
    """Whether `model` carries this backend's fake-quant modules."""
    from torch.ao.quantization.fake_quantize import FakeQuantizeBase

    return any(isinstance(m, FakeQuantizeBase) for m in model.modules())


def freeze(model: nn.Module) -> None:
    """Stop updating activation ranges and BatchNorm statistics (the usual last phase of QAT)."""
    from torch.ao.nn.intrinsic import qat as nniqat
    from torch.ao.quantization import disable_observer

    model.apply(disable_observer)
    model.apply(nniqat.freeze_bn_stats)


def convert(model: nn.Module) -> nn.Module:
    """Real int8 model (x86 kernels, CPU) from a prepared one; the prepared model is left unchanged."""
    from torch.ao.quantization.quantize_fx import convert_fx

    torch.backends.quantized.engine = ENGINE
    prepared = copy.deepcopy(model).cpu().eval()
    with _quiet():
        return convert_fx(prepared)


def skeleton(float_model: nn.Module, example_inputs: tuple[Any, ...], exclude_modules: Sequence[str] = ()
             ) -> nn.Module:
    """The converted structure for `float_model` (weights still to be filled by `load_state`)."""
    prepared = prepare(float_model, example_inputs, exclude_modules)
    prepared.eval()
    with torch.no_grad():
        prepared(*example_inputs)  # initialise every observer so convert sees valid ranges
    return convert(prepared)


def flatten_state(converted: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Plain tensors + a JSON description for the converted model's state (quantized tensors split
    into int8 data, scales and zero points; packed Linear params unpacked)."""
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, Any] = {}

    def put(key: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.is_quantized:
            data = value.int_repr()
            tensors[key] = data
            if value.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                tensors[f"{key}.__scales"] = value.q_per_channel_scales()
                tensors[f"{key}.__zero_points"] = value.q_per_channel_zero_points()
                return {"kind": "qtensor_per_channel", "dtype": str(value.dtype).replace("torch.", ""),
                        "axis": int(value.q_per_channel_axis())}
            return {"kind": "qtensor_per_tensor", "dtype": str(value.dtype).replace("torch.", ""),
                    "scale": float(value.q_scale()), "zero_point": int(value.q_zero_point())}
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().contiguous()
            return {"kind": "tensor"}
        if isinstance(value, tuple):
            return {"kind": "tuple", "items": [put(f"{key}.{i}", v) for i, v in enumerate(value)]}
        if isinstance(value, torch.dtype):
            return {"kind": "dtype", "dtype": str(value).replace("torch.", "")}
        if value is None:
            return {"kind": "none"}
        raise TypeError(f"cannot serialise {key}: {type(value).__name__}")

    for key, value in converted.state_dict().items():
        layout[key] = put(key, value)
    return tensors, layout


def unflatten_state(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    """Inverse of `flatten_state`: a state dict the converted skeleton loads with `load_state_dict`."""

    def get(key: str, entry: dict[str, Any]) -> Any:
        kind = entry["kind"]
        if kind == "tensor":
            return tensors[key]
        if kind == "qtensor_per_channel":
            return torch._make_per_channel_quantized_tensor(
                tensors[key], tensors[f"{key}.__scales"], tensors[f"{key}.__zero_points"], entry["axis"])
        if kind == "qtensor_per_tensor":
            return torch._make_per_tensor_quantized_tensor(tensors[key], entry["scale"], entry["zero_point"])
        if kind == "tuple":
            return tuple(get(f"{key}.{i}", item) for i, item in enumerate(entry["items"]))
        if kind == "dtype":
            return getattr(torch, entry["dtype"])
        if kind == "none":
            return None
        raise ValueError(f"unknown entry kind {kind!r} for {key}")

    return {key: get(key, entry) for key, entry in layout.items()}


def load_state(converted: nn.Module, tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> nn.Module:
    """Fill a converted skeleton with stored state (strict: every key must match)."""
    state = collections.OrderedDict(unflatten_state(tensors, layout))
    # module versions decide how quantized Linear reads its packed params: keep the skeleton's
    state._metadata = converted.state_dict()._metadata  # type: ignore[attr-defined]
    converted.load_state_dict(state, strict=True)
    return converted.eval()


def quantized_weights(converted: nn.Module) -> dict[str, torch.Tensor]:
    """`{name: int8 weight}` of the converted model's quantized layers (for sparsity accounting)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in converted.named_modules():
        weight = getattr(module, "weight", None)
        if callable(weight) and not isinstance(weight, nn.Parameter):
            try:
                w = weight()
            except Exception:  # noqa: BLE001 - modules with a weight() that needs arguments
                continue
            if isinstance(w, torch.Tensor) and w.is_quantized:
                out[f"{name}.weight"] = w.int_repr()
    return out
