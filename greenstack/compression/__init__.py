"""Compression cores as plain functions (usable outside the training loop): L2, gradual magnitude
pruning, int8 QAT backends, distillation students, and the compact artifact with its loader.
The policies in greenstack.policies.compression call these at the right events."""

from greenstack.compression.distill import build_student, distillation_loss, load_teacher, plan_student
from greenstack.compression.export import export_compressed, load_compressed
from greenstack.compression.l2 import decay_, l2_penalty
from greenstack.compression.pruning import (
    apply_masks_,
    compute_masks,
    cubic_sparsity,
    magnitude_prune_,
    sparsity_of,
)
from greenstack.compression.qat import choose_backend, convert_qat, prepare_qat

__all__ = ["apply_masks_", "build_student", "choose_backend", "compute_masks", "convert_qat", "cubic_sparsity",
           "decay_", "distillation_loss", "export_compressed", "l2_penalty", "load_compressed", "load_teacher",
           "magnitude_prune_", "plan_student", "prepare_qat", "sparsity_of"]
