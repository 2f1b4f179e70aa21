"""Checkpoints: capture/restore of a run's exact state, integrity-checked storage, encryption."""

from greenstack.checkpoint.codec import CheckpointError, decode, encode
from greenstack.checkpoint.snapshot import Snapshot, apply_snapshot, capture
from greenstack.checkpoint.store import Store, open_store

__all__ = ["CheckpointError", "Snapshot", "Store", "apply_snapshot", "capture", "decode", "encode", "open_store"]
