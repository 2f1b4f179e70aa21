"""Efficiency techniques as plain functions, usable outside the training loop.

The policies in `greenstack.policies.efficiency` wrap these with "probe, then decide" logic; the
functions here only do the mechanics (and measure), so they can be tested and reused alone.
"""

from greenstack.efficiency.attention import apply_sdpa, attention_implementation, set_attention_implementation
from greenstack.efficiency.batch_size import (
    BatchSizeResult,
    BatchTrial,
    lr_scale_factor,
    scale_learning_rate_,
    search_batch_size,
)
from greenstack.efficiency.checkpointing import (
    Unsupported,
    apply_activation_checkpointing,
    checkpointing_support,
    is_activation_checkpointing,
    remove_activation_checkpointing,
)
from greenstack.efficiency.compile import compile_in_place, try_compile, uncompile
from greenstack.efficiency.memory_format import apply_channels_last, channels_last_batch, conv_layer_count
from greenstack.efficiency.power_limit import GpuPowerControl, PowerLimitSweep, zeus_cost
from greenstack.efficiency.precision import amp_settings, apply_mixed_precision, candidate_dtype
from greenstack.efficiency.probe import Comparison, Timing, Variant, compare, probe_variants
from greenstack.efficiency.sampler import LengthGroupedSampler, padded_tokens, plan_padding

__all__ = [
    "BatchSizeResult", "BatchTrial", "Comparison", "GpuPowerControl", "LengthGroupedSampler", "PowerLimitSweep",
    "Timing", "Unsupported", "Variant", "amp_settings", "apply_activation_checkpointing", "apply_channels_last",
    "apply_mixed_precision", "apply_sdpa", "attention_implementation", "candidate_dtype", "channels_last_batch",
    "checkpointing_support", "compare", "compile_in_place", "conv_layer_count", "is_activation_checkpointing",
    "lr_scale_factor", "padded_tokens", "plan_padding", "probe_variants", "remove_activation_checkpointing",
    "scale_learning_rate_", "search_batch_size", "set_attention_implementation", "try_compile", "uncompile",
    "zeus_cost",
]
