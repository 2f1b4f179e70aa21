"""How a launcher hands a job's preemption channel to the run it starts.

Why: Hydra sits between a launcher's job entry point (`GreenstackSlurmLauncher.__call__`) and
`runner.run`, so the channel cannot be passed as an argument. The launcher opens `offered(channel)`
around the job; the runner takes it with `take()` for that run (a fresh channel otherwise). The
handle is a `ContextVar` set only inside that `with` block: it is reset when the job returns, so
nothing outlives the job (a multirun's next job gets its own channel).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from greenstack.engine.preemption import Preemption, PreemptionTaker

__all__ = ["Preemption", "PreemptionTaker", "offered", "take"]

_OFFERED: ContextVar[Preemption | None] = ContextVar("greenstack_offered_preemption", default=None)


@contextmanager
def offered(channel: Preemption) -> Iterator[Preemption]:
    """Within this block, the run the launcher starts uses `channel` (its signal handler's requests)."""
    token = _OFFERED.set(channel)
    try:
        yield channel
    finally:
        _OFFERED.reset(token)


def take() -> Preemption:
    """The channel a launcher offered to the run starting now, or a fresh one."""
    return _OFFERED.get() or Preemption()
