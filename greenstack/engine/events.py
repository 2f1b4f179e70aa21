"""The events the training loop dispatches to policies, in the order they occur."""

from __future__ import annotations

from enum import Enum


class Event(str, Enum):
    INIT = "init"
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    BATCH_START = "batch_start"
    AFTER_FORWARD = "after_forward"
    AFTER_BACKWARD = "after_backward"
    STEP_END = "step_end"
    EVAL_END = "eval_end"
    EPOCH_END = "epoch_end"
    CHECKPOINT = "checkpoint"
    FIT_END = "fit_end"
    EXCEPTION = "exception"
