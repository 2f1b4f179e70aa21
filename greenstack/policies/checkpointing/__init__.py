"""Checkpointing policies."""
