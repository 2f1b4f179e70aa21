"""Trackers: one interface for W&B, MLflow, local files and nothing."""

from greenstack.tracking.base import JsonlWriter, NullTracker, Tracker, load_or_create_run_id

__all__ = ["JsonlWriter", "NullTracker", "Tracker", "load_or_create_run_id"]
