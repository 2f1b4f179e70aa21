"""Mixed precision: which autocast dtype a device should try, and the grad scaler fp16 needs.

bf16 keeps fp32's exponent range, so it trains without loss scaling; fp16 needs a GradScaler to
keep small gradients from flushing to zero. Whether either is *faster* is not decided here: CPUs
without usable AMX run bf16 autocast many times slower than fp32, and some VMs advertise `amx_bf16`
without letting the process use it, so the policy probes instead of trusting flags.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

PrecisionMode = Literal["auto", "bf16", "fp16", "off"]
DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
NAMES: dict[torch.dtype, str] = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def dtype_name(dtype: torch.dtype | None) -> str:
    return NAMES.get(dtype, "fp32") if dtype is not None else "fp32"


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The bf16-related CPU flags the kernel reports (for messages only: flags are not speed)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return []
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[-1].split())
    return sorted(f for f in ("amx_bf16", "avx512_bf16") if f in flags)


def candidate_dtype(mode: PrecisionMode, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype to try on `device` for `mode`, or None with the reason there is none."""
    if mode == "off":
        return None, "mode=off"
    if mode in DTYPES:
        return DTYPES[mode], f"mode={mode}"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16, "CUDA device supports bf16"
        return torch.float16, "CUDA device without bf16: fp16 with a grad scaler"
    if device.type == "cpu":
        return torch.bfloat16, "CPU autocast supports bf16 only usefully"
    if device.type == "mps":
        return torch.float16, "MPS autocast is fp16"
    return None, f"no autocast support known for device type {device.type!r}"


@dataclass
class AmpSettings:
    """What to put on State: `autocast_dtype` (the loop wraps forward+loss) and `grad_scaler`."""

    autocast_dtype: torch.dtype | None
    grad_scaler: Any = None


def amp_settings(dtype: torch.dtype | None, device: torch.device) -> AmpSettings:
    """Autocast dtype plus, for fp16, a `torch.amp.GradScaler` for the device (None for bf16/fp32)."""
    if dtype is torch.float16:
        return AmpSettings(dtype, torch.amp.GradScaler(device.type))
    return AmpSettings(dtype, None)


def apply_mixed_precision(state: Any, dtype: torch.dtype | None) -> AmpSettings:
    """Switch a training State to `dtype` autocast (None = fp32), with the matching grad scaler."""
    settings = amp_settings(dtype, state.device)
    state.autocast_dtype, state.grad_scaler = settings.autocast_dtype, settings.grad_scaler
    return settings
