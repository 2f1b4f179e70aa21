"""SDPA attention kernels (transformers attn_implementation, timm fused_attn), kept where they help."""

from __future__ import annotations

from typing import Literal

from greenstack.efficiency.attention import attention_implementation, set_attention_implementation
from greenstack.efficiency.checkpointing import Unsupported
from greenstack.efficiency.probe import Variant, module_of
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import checked
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


class SdpaAttention(ProbingPolicy):
    """Uses PyTorch's scaled_dot_product_attention for the model's attention.

    `auto` times eager vs SDPA attention on the first batch. It switches the model only for a clear
    gain (`min_speedup`) in either direction, so an already-SDPA model stays SDPA unless eager is
    measurably faster. Warns when the model has no attention (CNNs) or cannot switch.
    """

    key = "sdpa"
    events = frozenset({Event.BATCH_START})

    @checked(config_key)
    def __init__(self, enabled: Enabled = True, mode: Literal["auto", "on", "off"] = "auto", min_speedup: Speedup = 1.05,
                 probe_steps: Count = 1, probe_rounds: Count = 3) -> None:
        super().__init__(enabled, mode, [], min_speedup=min_speedup, probe_steps=probe_steps,
                         probe_rounds=probe_rounds)
        self.implementation: str | None = None

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if self.decided:
            return
        model_name = type(module_of(state.model)).__name__
        current = attention_implementation(state.model)
        if current is None:
            self.warn(state, reporter, f"no effect — {model_name} has no attention layers")
            self.decide(state, reporter, False, f"{model_name} has no attention layers")
            return
        if self.mode == "off":
            self.implementation = current
            self.decide(state, reporter, current == "sdpa", f"mode=off: left the model's {current} attention")
            return
        restored = self.restored_choice()
        if restored is not None:
            self._set(state, reporter, str((self.restored or {}).get("implementation") or ("sdpa" if restored else "eager")),
                      self.restored_why)
            return
        if self.frozen(state):
            self._set(state, reporter, current, f"{FROZEN_WHY}: the model's {current} attention")
            return
        try:
            cmp = self.probe(state,
                             Variant("eager", prepare=lambda m: _switch(m, "eager"), autocast_dtype=state.autocast_dtype),
                             Variant("sdpa", prepare=lambda m: _switch(m, "sdpa"), autocast_dtype=state.autocast_dtype))
        except ProbeOutOfMemory as e:
            self.warn(state, reporter, f"cannot probe: out of memory ({e})")
            self._set(state, reporter, "sdpa" if self.mode == "on" else current, "not probed: out of memory")
            return
        except Unsupported as e:
            self.warn(state, reporter, f"cannot switch attention — {e}")
            self.implementation = current
            self.decide(state, reporter, current == "sdpa", f"kept the model's {current} attention ({e})")
            return
        self.record_comparison(state, reporter, cmp)
        what = f"{cmp.describe('sdpa', 'eager')} for {model_name} on {device_words(state.device)}"
        if self.mode == "on":
            if cmp.gain < 1.0:
                self.warn(state, reporter, f"mode=on forced although {what}")
            self._set(state, reporter, "sdpa", what, **self.comparison_data(cmp))
            return
        if current == "sdpa":
            target = "eager" if cmp.hurts(self.min_speedup) else "sdpa"
        else:
            target = "sdpa" if cmp.helps(self.min_speedup) else current
        if target == current:
            if current == "eager" and cmp.gain >= 1.0:
                what += self.short_of(cmp)
            what += f"; kept the model's {current} attention"
        self._set(state, reporter, target, what, **self.comparison_data(cmp))

    def _set(self, state: State, reporter: Reporter, target: str, reason: str, **data: object) -> None:
        if attention_implementation(state.model) != target:
            set_attention_implementation(state.model, target)  # type: ignore[arg-type]
        self.implementation = target
        self.decide(state, reporter, target == "sdpa", reason, implementation=target, **data)


def _switch(model, impl: str) -> None:  # noqa: ANN001 - nn.Module
    set_attention_implementation(model, impl)  # type: ignore[arg-type]
