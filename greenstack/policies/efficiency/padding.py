"""Dynamic padding with length-grouped batches for text; measures the padding the run actually did."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import torch

from greenstack.efficiency.sampler import LengthGroupedSampler, plan_padding
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import between, checked
from greenstack.policies.efficiency._common import (
    EfficiencyPolicy,
    Enabled,
    config_key,
    train_loader_of,
)
from greenstack.provenance import Figure


class DynamicPadding(EfficiencyPolicy):
    """Groups text samples of similar length into batches when that saves work.

    The text builders pad each batch to its own longest sequence and give the train loader a
    `LengthGroupedSampler`. Before training, this policy counts the tokens one epoch would process
    with random vs length-grouped batches (exact counts from a copy of the loader's generator) and,
    in `auto`, groups when that saves at least `min_saving` of them. During training it counts real
    vs padded tokens of every batch, so the report shows the padding the run really paid for.
    """

    key = "padding"
    events = frozenset({Event.FIT_START, Event.BATCH_START})

    @checked(config_key)
    def __init__(self, enabled: Enabled = True, mode: Literal["auto", "on", "off"] = "auto",
                 min_saving: Annotated[float, between(0, 1, high_open=True)] = 0.1) -> None:
        super().__init__(enabled, [])
        self.mode, self.min_saving = mode, float(min_saving)
        self._real: torch.Tensor | None = None
        self._total = 0
        self._checked_batch = False

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.FIT_START:
            self._plan(state, reporter)
        else:
            self._count(state, reporter)

    def _plan(self, state: State, reporter: Reporter) -> None:
        loader = train_loader_of(state)
        sampler = getattr(loader, "sampler", None)
        if not isinstance(sampler, LengthGroupedSampler):
            return  # decided at the first batch, when we can see whether the data is text at all
        multiple_of = int(getattr(loader.collate_fn, "multiple_of", 1))
        plan = plan_padding(sampler, state.batch_size or int(loader.batch_size or 1), multiple_of)
        saving = 1.0 - plan.grouped_ratio
        source = (f"token counts of one epoch's batches (batch {state.batch_size}, {len(sampler.lengths)} samples), "
                  "random vs length-grouped order")
        self.figures["efficiency/padding_grouped_token_ratio"] = Figure(plan.grouped_ratio, "x", "measured", source)
        what = (f"length-grouped batches process {saving:.0%} fewer tokens per epoch "
                f"({plan.grouped_tokens:,} vs {plan.random_tokens:,}; {plan.real_tokens:,} real)")
        restored = None if self.restored is None else self.restored.get("on")
        if restored is not None:
            group, what = bool(restored), self.restored_why
        elif self.mode == "off":
            group, what = sampler.group_by_length, f"mode=off: left data.group_by_length={sampler.group_by_length}"
        elif self.mode == "on" or sampler.group_by_length:
            group = True
        else:
            group = saving >= self.min_saving
            if not group:
                what += f", below min_saving {self.min_saving:.0%}"
        sampler.group_by_length = group
        self.decide(state, reporter, group, what, random_tokens=plan.random_tokens, grouped_tokens=plan.grouped_tokens,
                    real_tokens=plan.real_tokens)

    def _count(self, state: State, reporter: Reporter) -> None:
        inputs = state.batch.get("inputs") if isinstance(state.batch, dict) else None
        mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
        if not self._checked_batch:
            self._checked_batch = True
            packed = isinstance(inputs, torch.Tensor) and not inputs.is_floating_point() and inputs.ndim == 2
            if mask is None and packed and not self.decided:
                self.warn(state, reporter, "no effect — packed token blocks (language-model corpora): every position is a "
                                 "real token, nothing is padded")
                self.decide(state, reporter, False, "packed token blocks: no padding")
            elif mask is None and not self.decided:
                self.warn(state, reporter, "no effect — the inputs are not padded token sequences")
                self.decide(state, reporter, False, "no text inputs")
            elif not self.decided:
                self.warn(state, reporter, "cannot group by length — the train loader has no LengthGroupedSampler "
                                 "(use the text_csv or synthetic_text data builders)")
                self.decide(state, reporter, False, "no LengthGroupedSampler; batches are padded as the loader does")
        if mask is None:
            return
        real = mask.sum()  # stays on the device: no host sync per step
        self._real = real if self._real is None else self._real + real
        self._total += mask.numel()

    def summary(self) -> dict[str, Any]:
        figures = super().summary()
        if self._real is not None and self._total:
            fraction = 1.0 - float(self._real) / self._total
            figures["efficiency/padding_fraction"] = Figure(
                fraction, "fraction", "measured", f"padded / processed tokens over the run's {self._total:,} "
                                                  "training tokens (attention masks)")
        return figures
