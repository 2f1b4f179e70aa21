"""Policies: one module each, grouped as scheduler/efficiency/compression/checkpointing/federated."""
