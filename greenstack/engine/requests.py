"""Typed requests between policies and the loop (members of `State.requests`), instead of string keys.

- `batch_size`: a policy asks the loop to change the batch size; the loop applies it at the next
  epoch start (engine/resize.py) and lists the applied change in `State.batch_size_changes`;
- `pause`: a policy (e.g. `efficiency.alerts` on high carbon intensity) asks the scheduler's
  pause policy to pause; the pause policy clears it once it has acted, the requester may withdraw it.

Before the first step a policy changes the batch size directly with `state.set_batch_size(n)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class BatchSizeRequest:
    """Change the batch size to `batch_size` at the next epoch start; scale the LR by `lr_scaling`
    (`none`, `linear` or `sqrt`)."""

    batch_size: int
    reason: str | None = None
    by: str | None = None
    step: int | None = None
    lr_scaling: str = "none"


@dataclass
class PauseRequest:
    """Pause the run (until the intensity is at or below `threshold` g/kWh, else the pauser's level)."""

    by: str
    reason: str = ""
    metric: str | None = None
    value: float | None = None
    threshold: float | None = None
    step: int | None = None
    at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The request as recorded in decisions (fields that are set)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class Requests:
    """Open requests; whoever acts on one sets it back to None."""

    batch_size: BatchSizeRequest | None = None
    pause: PauseRequest | None = None
