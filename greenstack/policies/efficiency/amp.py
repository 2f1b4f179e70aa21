"""Mixed precision (bf16, or fp16 with a grad scaler), kept only where a probe shows it helps."""

from __future__ import annotations

import logging
from typing import Any, Literal

from greenstack.efficiency.precision import (
    DTYPES,
    apply_mixed_precision,
    candidate_dtype,
    cpu_bf16_flags,
    dtype_name,
)
from greenstack.efficiency.probe import Variant
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, checked
from greenstack.policies.efficiency._common import (
    FROZEN_WHY,
    Count,
    Enabled,
    ProbeOutOfMemory,
    ProbingPolicy,
    Speedup,
    config_key,
    device_words,
)
from greenstack.provenance import Figure


class MixedPrecision(ProbingPolicy):
    """Autocast the forward pass in bf16/fp16.

    `auto` picks the dtype per device (CUDA: bf16 where supported, else fp16 + GradScaler; CPU: bf16),
    times a few fwd+bwd steps with and without it on the first batch, and keeps it only for a gain of
    at least `min_speedup`. `bf16`/`fp16` force it (still measured, with a warning when slower).
    """

    key = "amp"
    events = frozenset({Event.BATCH_START})

    @checked(config_key)
    def __init__(self, enabled: Enabled = True, mode: Literal["auto", "bf16", "fp16", "off"] = "auto",
                 min_speedup: Speedup = 1.05, probe_steps: Count = 1, probe_rounds: Count = 3) -> None:
        super().__init__(enabled, mode, [], min_speedup=min_speedup, probe_steps=probe_steps,
                         probe_rounds=probe_rounds)
        self.dtype_name = "fp32"
        self._scaler_state: dict[str, Any] | None = None
        self._scaler: Any = None

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if self.decided:
            return
        if state.autocast_dtype is not None:
            self.warn(state, reporter, f"no effect — the run already autocasts to {dtype_name(state.autocast_dtype)}")
            self.decide(state, reporter, True, f"{dtype_name(state.autocast_dtype)} set before this policy")
            return
        restored = self.restored_choice()
        if restored is not None:
            self._apply_restored(state, reporter, restored)
            return
        if self.frozen(state):
            self.decide(state, reporter, False, FROZEN_WHY, dtype="fp32")
            return
        dtype, why = candidate_dtype(self.mode, state.device)  # type: ignore[arg-type]
        if dtype is None:
            self.decide(state, reporter, False, why)
            return
        name = dtype_name(dtype)
        try:
            cmp = self.probe(state, Variant("fp32"), Variant(name, autocast_dtype=dtype))
        except ProbeOutOfMemory as e:
            self.warn(state, reporter, f"cannot probe: out of memory ({e})")
            self.decide(state, reporter, self.mode != "auto", "not probed: out of memory")
            if self.mode != "auto":
                self._scaler = apply_mixed_precision(state, dtype).grad_scaler
                self.dtype_name = name
            return
        except Exception as e:  # noqa: BLE001 - a dtype the device cannot run
            if self.mode != "auto":
                raise ConfigError(f"{name} autocast fails on {state.device}: {e}", key=self.param("mode"),
                                  value=self.mode, fix="use efficiency.amp.mode=auto or off") from e
            self.decide(state, reporter, False, f"{name} autocast failed on {state.device}: {type(e).__name__}: {e}")
            return
        self.record_comparison(state, reporter, cmp)
        what = f"{cmp.describe(name, 'fp32')} on {device_words(state.device)}"
        if self.mode == "auto":
            on = cmp.helps(self.min_speedup)
            if not on and cmp.gain >= 1.0:
                what += self.short_of(cmp)
            if not on and state.device.type == "cpu" and dtype in DTYPES.values():
                flags = cpu_bf16_flags()
                if flags:
                    what += f" (although /proc/cpuinfo lists {', '.join(flags)})"
        else:
            on = True
            if cmp.gain < 1.0:
                self.warn(state, reporter, f"mode={self.mode} forced although {what}")
        if on:
            self.dtype_name = name
            self._scaler = apply_mixed_precision(state, dtype).grad_scaler
        self.decide(state, reporter, on, what, level=logging.INFO if on or self.mode == "auto" else logging.WARNING,
                    dtype=name if on else "fp32", **self.comparison_data(cmp))

    def _apply_restored(self, state: State, reporter: Reporter, on: bool) -> None:
        name = (self.restored or {}).get("dtype", "fp32")
        on = on and name in DTYPES
        if on:
            settings = apply_mixed_precision(state, DTYPES[name])
            if settings.grad_scaler is not None and self._scaler_state:
                settings.grad_scaler.load_state_dict(self._scaler_state)
            self._scaler, self.dtype_name = settings.grad_scaler, name
        self.decide(state, reporter, on, f"{name if on else 'fp32'} ({self.restored_why})",
                    dtype=name if on else "fp32")

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["dtype"] = self.dtype_name
        if self._scaler is not None:  # the loop's snapshot restores the scaler only if it exists at resume
            sd["grad_scaler"] = self._scaler.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._scaler_state = state.get("grad_scaler")

    def summary(self) -> dict[str, Any]:
        figures = super().summary()
        if self.on is not None:
            figures["efficiency/amp_dtype"] = Figure(self.dtype_name, "dtype", "measured", self.reason)
        return figures
