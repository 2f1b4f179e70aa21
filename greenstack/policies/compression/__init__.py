"""Compression policies, one per stage, composable in a recipe's `compression` group in this order:
l2 -> prune -> qat -> distill (any subset), then export, which writes and measures the artifact."""

from greenstack.policies.compression.distill import Distillation
from greenstack.policies.compression.export import ExportCompressed
from greenstack.policies.compression.l2 import L2Regularization
from greenstack.policies.compression.prune import MagnitudePruning
from greenstack.policies.compression.qat import Int8QAT

__all__ = ["Distillation", "ExportCompressed", "Int8QAT", "L2Regularization", "MagnitudePruning"]
