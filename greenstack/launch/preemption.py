"""A process-wide preemption request, so a signal is honoured at a step boundary, not inside a handler.

Why: Slurm (through submitit) announces a timeout or preemption with a signal. A handler runs
between two bytecodes of the training loop, possibly in the middle of an optimizer step, so it must
not snapshot the model itself. The launcher's handler (and the checkpointing policy's own) only
*request* a checkpoint here; the checkpointing policy saves at the next step end, stops the run, and
marks the request honoured so the launcher can requeue the job. Single process, single request.

Several workers (torch.distributed): each worker's request alone must not stop it, or the others
would wait on a collective it never joins. A federated policy installs a *coordinator*, and the
checkpointing policy asks `agreed(...)` at every step end: `federated=ddp` agrees per step (one
scalar all-reduce), `federated=geo` at the next round's exchange, where it calls `preempt_now` on
every worker at the same step. Every worker then saves its own checkpoint at that step.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_lock = threading.Lock()


@dataclass
class _Registry:
    requested_signum: int | None = None
    #: where the preemption checkpoint went and at which step, once a policy has saved it
    saved: dict[str, Any] | None = None
    listeners: list[Any] = field(default_factory=list)
    #: (this worker's pending signal or None) -> (signal, requesting rank) the group agreed to stop on now
    coordinator: Callable[[int | None], tuple[int, int] | None] | None = None
    #: (state) -> whether a snapshot may be taken at this step end (None: always)
    snapshot_gate: Callable[[Any], bool] | None = None


_state = _Registry()


def request(signum: int) -> None:
    """Ask the running checkpointing policy to save and stop at the next step boundary."""
    with _lock:
        if _state.requested_signum is None:
            _state.requested_signum = signum


def requested() -> int | None:
    """The signal number of the pending request, or None."""
    return _state.requested_signum


def mark_saved(where: str, step: int, signum: int) -> None:
    """Called by the checkpointing policy once the preemption checkpoint is written."""
    with _lock:
        _state.saved = {"where": where, "step": step, "signal": signal.Signals(signum).name}


def saved() -> dict[str, Any] | None:
    """{'where', 'step', 'signal'} of the checkpoint written for a preemption in this process, or None."""
    return _state.saved


def register(policy: Any) -> None:
    """A checkpointing policy that honours requests is training (from its INIT to FIT_END).

    One run trains at a time in a process, so it replaces any policy a failed run left registered.
    """
    with _lock:
        _state.listeners[:] = [policy]


def unregister(policy: Any) -> None:
    with _lock:
        if policy in _state.listeners:
            _state.listeners.remove(policy)


def honoured() -> bool:
    """True while a policy is training that will save at the next step when a request is made."""
    return bool(_state.listeners)


def coordinate(fn: Callable[[int | None], tuple[int, int] | None] | None) -> None:
    """Install (or with None remove) the group's agreement function; see the module docstring."""
    with _lock:
        _state.coordinator = fn


def gate_snapshots(fn: Callable[[Any], bool] | None) -> None:
    """Install (or with None remove) a rule for where periodic snapshots may be taken.

    Why: `geo` workers that sit a round out skip its steps, so "every N steps" would save them in
    other rounds than the workers that trained; at round boundaries every worker's state lines up.
    """
    with _lock:
        _state.snapshot_gate = fn


def snapshot_allowed(state: Any) -> bool:
    """Whether a due periodic snapshot may be taken at this step end (deferred to the next allowed one)."""
    gate = _state.snapshot_gate
    return True if gate is None else bool(gate(state))


def at_boundary(state: Any) -> None:
    """A group policy reached a point where every worker's state lines up: take a due snapshot now.

    Why: a `geo` worker that sits rounds out runs no step ends for them, so without this call it would
    never reach the round boundaries where the other workers save.
    """
    for policy in list(_state.listeners):
        hook = getattr(policy, "at_boundary", None)
        if callable(hook):
            hook(state)


def agreed(local: int | None) -> tuple[int, int | None] | None:
    """(signal, requesting rank) to preempt on at this step boundary, or None to go on.

    Alone: this worker's own request (rank None). In a group: what the coordinator says all agreed on.
    """
    fn = _state.coordinator
    if fn is None:
        return None if local is None else (local, None)
    return fn(local)


def pending() -> int | None:
    """This worker's pending request: the launcher's, or one a checkpointing policy's own handler caught."""
    if _state.requested_signum is not None:
        return _state.requested_signum
    for policy in list(_state.listeners):
        signum = getattr(policy, "pending_signal", None)
        if signum is not None:
            return int(signum)
    return None


def preempt_now(state: Any, signum: int, reason: str) -> None:
    """Have the training checkpointing policy save and stop now (a group's agreed preemption)."""
    if not _state.listeners:
        from greenstack.errors import GreenstackError

        raise GreenstackError(f"preempted ({reason}) but no checkpointing policy is training to save the run: "
                              "use checkpointing=hierarchical to resume after preemption")
    _state.listeners[0].preempt(state, signum, reason)


def end_run() -> None:
    """Forget the finished (or failed) run's policies and group hooks; keep `saved` for the launcher."""
    with _lock:
        _state.listeners.clear()
        _state.coordinator = None
        _state.snapshot_gate = None


def reset() -> None:
    """Forget requests and saves (a new job in this process, or a test)."""
    with _lock:
        _state.requested_signum = None
        _state.saved = None
        _state.listeners.clear()
        _state.coordinator = None
        _state.snapshot_gate = None
