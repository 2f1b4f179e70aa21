"""Activation checkpointing, turned on only under measured memory pressure (it always costs time)."""

from __future__ import annotations

from typing import Annotated, Literal

from greenstack.efficiency.checkpointing import (
    Unsupported,
    apply_activation_checkpointing,
    checkpointing_support,
    is_activation_checkpointing,
)
from greenstack.efficiency.probe import Variant, device_memory_bytes, memory_in_use_bytes, module_of
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import between, checked
from greenstack.policies.efficiency._common import (
    Count,
    Enabled,
    ProbeOutOfMemory,
    ProbingPolicy,
    config_key,
)
from greenstack.provenance import Figure


class ActivationCheckpointing(ProbingPolicy):
    """Recomputes activations in backward instead of keeping them.

    Checkpointing never makes a step faster; it pays off when the memory it frees is needed (a larger
    batch, a bigger model, no OOM). `auto` therefore probes time and activation memory with and
    without it and turns it on only when the run's peak memory is at least `memory_threshold` of
    the device (GPU: allocator peak; CPU: RSS / RAM). Warns for models without support.
    """

    key = "activation_checkpointing"
    events = frozenset({Event.BATCH_START})

    @checked(config_key)
    def __init__(self, enabled: Enabled = True, mode: Literal["auto", "on", "off"] = "auto",
                 memory_threshold: Annotated[float, between(0, 1, low_open=True, fix="a fraction of device memory")]
                 = 0.8, probe_steps: Count = 1, probe_rounds: Count = 2) -> None:
        super().__init__(enabled, mode, [], probe_steps=probe_steps, probe_rounds=probe_rounds)
        self.memory_threshold = float(memory_threshold)
        self.method = ""

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if self.decided:
            return
        model_name = type(module_of(state.model)).__name__
        if is_activation_checkpointing(state.model):
            self.decide(state, reporter, True, f"{model_name} already checkpoints its activations")
            return
        if checkpointing_support(state.model) is None:
            self.warn(state, reporter, f"no effect — {model_name} does not support activation checkpointing (no timm/"
                             "transformers switch and no repeated blocks to wrap)")
            self.decide(state, reporter, False, f"{model_name} has no checkpointing support")
            return
        if self.settled_without_probe(state, reporter, self._set):
            return
        try:
            cmp = self.probe(state, Variant("full activations", autocast_dtype=state.autocast_dtype),
                             Variant("checkpointed", prepare=_apply, autocast_dtype=state.autocast_dtype),
                             measure_memory=True)
        except Unsupported as e:
            self.warn(state, reporter, f"no effect — {e}")
            self.decide(state, reporter, False, str(e))
            return
        except ProbeOutOfMemory as e:  # copies of the model did not fit: that is memory pressure
            self._set(state, reporter, True, f"the probe ran out of memory ({e}): memory is tight")
            return
        self.record_comparison(state, reporter, cmp)
        base, ckpt = cmp.baseline, cmp.candidate
        limit = device_memory_bytes(state.device)
        if state.device.type == "cuda" and base.peak_memory_bytes is not None:
            used, where = base.peak_memory_bytes, "GPU allocator peak"
        else:
            used, where = memory_in_use_bytes(state.device), "process RSS"
        fraction = used / limit
        kept = (ckpt.saved_activation_bytes or 0) / base.saved_activation_bytes if base.saved_activation_bytes else 1.0
        self.figures["efficiency/activation_checkpointing_activation_ratio"] = Figure(
            kept, "x", "measured", "bytes autograd saved for backward with/without checkpointing on the first batch "
                                   "(saved-tensor hooks; block inputs not counted)")
        self.figures["efficiency/activation_checkpointing_memory_fraction"] = Figure(
            fraction, "fraction", "measured", f"{where} / device memory during the probe")
        effect = (f"keeps {kept:.0%} of the activations at {1 / cmp.speedup:.2f}× step time; "
                  f"{where} is {fraction:.0%} of memory (threshold {self.memory_threshold:.0%})")
        on = fraction >= self.memory_threshold if self.mode == "auto" else True
        self._set(state, reporter, on, effect, memory_fraction=fraction, activation_ratio=kept, **self.comparison_data(cmp))

    def _set(self, state: State, reporter: Reporter, on: bool, reason: str, **data: object) -> None:
        if on:
            self.method = apply_activation_checkpointing(state.model)
            reason = f"{reason} [{self.method}]"
        self.decide(state, reporter, on, reason, **data)


def _apply(model) -> None:  # noqa: ANN001 - nn.Module
    apply_activation_checkpointing(model)
