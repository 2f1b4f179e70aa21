"""A model's architecture as a small JSON-able dict, so an exported artifact can rebuild it.

An artifact stores weights only; the loader rebuilds the float architecture from this spec and then
fills it. Builders (and the student builders here) attach the spec as `model.greenstack_spec`; for
models built elsewhere it is inferred: transformers models carry their config (and `head: causal_lm`
for decoders with a language-model head, sequence classification otherwise), timm models their
architecture name (timm constructor kwargs cannot be recovered from a built model, so such a model
needs the attached spec).
"""

from __future__ import annotations

import contextlib
import copy
import os
from typing import Any

import torch
from torch import nn

from greenstack.errors import ConfigError

SPEC_ATTR = "greenstack_spec"


def attach_spec(model: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Record how to rebuild `model` (kept through `copy.deepcopy`); returns the model."""
    object.__setattr__(model, SPEC_ATTR, copy.deepcopy(spec))
    return model


def input_channels(model: nn.Module) -> int:
    """Image channels the first convolution takes (3 when the model has none)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    return 3


def num_labels(model: nn.Module) -> int | None:
    """Size of a classifier's label space (a language model's: its vocabulary): transformers config,
    timm head, else the last Linear."""
    config = getattr(model, "config", None)
    if config is not None and is_causal_lm(model):
        return int(model.get_output_embeddings().out_features)  # type: ignore[operator]
    if config is not None and getattr(config, "num_labels", None) is not None:
        return int(config.num_labels)
    spec = getattr(model, SPEC_ATTR, None)
    if isinstance(spec, dict) and spec.get("num_classes") is not None:
        return int(spec["num_classes"])
    value = getattr(model, "num_classes", None)
    if isinstance(value, int):
        return value
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    return last.out_features if last is not None else None


def is_causal_lm(model: nn.Module) -> bool:
    """Whether `model` is a transformers decoder with a language-model head (GPT-2, Llama, ...)."""
    if not type(model).__module__.startswith("transformers."):
        return False
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return type(model).__name__ in names


def model_spec(model: nn.Module) -> dict[str, Any]:
    """How to rebuild `model`'s float architecture; ConfigError when it cannot be told."""
    spec = getattr(model, SPEC_ATTR, None)
    if isinstance(spec, dict):
        return copy.deepcopy(spec)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and hasattr(model, "can_generate"):
        spec: dict[str, Any] = {"builder": "transformers", "config": config.to_dict()}
        if is_causal_lm(model):
            spec["head"] = "causal_lm"
        return spec
    pretrained_cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(pretrained_cfg, dict) and pretrained_cfg.get("architecture"):
        return {"builder": "timm", "name": pretrained_cfg["architecture"], "num_classes": num_labels(model),
                "in_chans": input_channels(model), "kwargs": {}, "kwargs_known": False}
    raise ConfigError(f"cannot tell how to rebuild a {type(model).__name__} for export", key="compression",
                      value=type(model).__name__,
                      fix="build the model with greenstack.models (timm or transformers) or attach a spec "
                          "with greenstack.models.spec.attach_spec")


def build_from_spec(spec: dict[str, Any], *, device: torch.device | str | None = None) -> nn.Module:
    """A freshly initialised float model for `spec` (on the meta device when `device="meta"`)."""
    builder = spec.get("builder")
    if builder == "timm":
        import timm

        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = timm.create_model(spec["name"], num_classes=spec["num_classes"], in_chans=spec["in_chans"],
                                      **dict(spec.get("kwargs") or {}))
    elif builder == "transformers":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

        cfg = dict(spec["config"])
        model_type = cfg.pop("model_type")
        for key in ("transformers_version", "_name_or_path", "architectures"):
            cfg.pop(key, None)
        hf_config = AutoConfig.for_model(model_type, **cfg)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            auto = AutoModelForCausalLM if spec.get("head") == "causal_lm" else AutoModelForSequenceClassification
            model = auto.from_config(hf_config)
    else:
        raise ConfigError(f"unknown model builder {builder!r} in spec", key="compression", value=builder)
    return attach_spec(model, spec)


def verify_spec(model: nn.Module, spec: dict[str, Any]) -> None:
    """ConfigError unless `spec` rebuilds an architecture with `model`'s parameter names and shapes
    (checked on the meta device: no memory, no weights). QAT-prepared models are skipped: their
    spec was taken from the float model before `prepare`."""
    if getattr(model, "greenstack_qat", None) is not None:
        return
    try:
        rebuilt = build_from_spec(spec, device="meta")
    except Exception as e:  # noqa: BLE001 - any failure to rebuild is the same user-facing problem
        raise ConfigError(f"cannot rebuild the model from its spec: {e}", key="compression", value=spec.get("name")) from e
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    got = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items() if isinstance(v, torch.Tensor)}
    if want != got:
        differ = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        raise ConfigError(
            f"the model cannot be rebuilt for export: {spec.get('name') or spec.get('builder')} built from its "
            f"name differs in {len(differ)} tensors (e.g. {', '.join(differ[:3])})", key="compression",
            value=spec.get("name"),
            fix="timm constructor kwargs (model.kwargs) are not recoverable from a built model: build it with "
                "greenstack.models.build_timm (records them) or attach a spec with attach_spec")
