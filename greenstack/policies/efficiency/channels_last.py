"""channels_last (NHWC) for CNNs, kept only where a probe shows it helps."""

from __future__ import annotations

from typing import Literal

from greenstack.efficiency.memory_format import (
    apply_channels_last,
    channels_last_batch,
    conv_layer_count,
    has_image_inputs,
    is_attention_model,
)
from greenstack.efficiency.probe import Variant, module_of
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import checked
from greenstack.policies.efficiency._common import (
    Count,
    Enabled,
    ProbeOutOfMemory,
    ProbingPolicy,
    Speedup,
    config_key,
    device_words,
)


class ChannelsLast(ProbingPolicy):
    """Converts a CNN and its image batches to channels_last.

    Warns (no effect) for models without Conv2d or batches without 4-D images, and (misuse) for
    attention models, whose only conv is the patch embedding; `auto` does not even probe those.
    """

    key = "channels_last"
    events = frozenset({Event.BATCH_START})

    @checked(config_key)
    def __init__(self, enabled: Enabled = True, mode: Literal["auto", "on", "off"] = "auto", min_speedup: Speedup = 1.05,
                 probe_steps: Count = 1, probe_rounds: Count = 3) -> None:
        super().__init__(enabled, mode, [], min_speedup=min_speedup, probe_steps=probe_steps,
                         probe_rounds=probe_rounds)

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if self.decided:
            if self.on:
                state.batch = channels_last_batch(state.batch)
            return
        model_name = type(module_of(state.model)).__name__
        if not has_image_inputs(state.batch):
            self.warn(state, reporter, "no effect — the inputs are not 4-D image batches")
            self.decide(state, reporter, False, "no image inputs")
            return
        convs = conv_layer_count(state.model)
        if convs == 0:
            self.warn(state, reporter, f"no effect — {model_name} has no Conv2d layers")
            self.decide(state, reporter, False, f"{model_name} has no Conv2d layers")
            return
        if is_attention_model(state.model):
            self.warn(state, reporter, f"little or no effect — {model_name} is attention-based ({convs} Conv2d, the patch "
                             "embedding); channels_last speeds up convolutions")
            if self.mode == "auto":
                self.decide(state, reporter, False, f"{model_name} is attention-based; not probed")
                return
        if self.settled_without_probe(state, reporter, self._set):
            return
        try:
            cmp = self.probe(state, Variant("NCHW", autocast_dtype=state.autocast_dtype),
                             Variant("channels_last", prepare=apply_channels_last, transform_batch=channels_last_batch,
                                     autocast_dtype=state.autocast_dtype))
        except ProbeOutOfMemory as e:
            self.warn(state, reporter, f"cannot probe: out of memory ({e})")
            self._set(state, reporter, self.mode == "on", "not probed: out of memory")
            return
        self.record_comparison(state, reporter, cmp)
        what = f"{cmp.describe('channels_last', 'NCHW')} for {model_name} on {device_words(state.device)}"
        on = cmp.helps(self.min_speedup) if self.mode == "auto" else True
        if self.mode == "auto" and not on and cmp.gain >= 1.0:
            what += self.short_of(cmp)
        if self.mode == "on" and cmp.gain < 1.0:
            self.warn(state, reporter, f"mode=on forced although {what}")
        self._set(state, reporter, on, what, **self.comparison_data(cmp))

    def _set(self, state: State, reporter: Reporter, on: bool, reason: str, **data: object) -> None:
        if on:
            apply_channels_last(state.model)
            state.batch = channels_last_batch(state.batch)
        self.decide(state, reporter, on, reason, **data)
