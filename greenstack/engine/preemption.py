"""One run's preemption channel: a signal is honoured at a step boundary, not inside a handler.

Why: Slurm (through submitit) announces a timeout or preemption with a signal. A handler runs
between two bytecodes of the training loop, possibly in the middle of an optimizer step, so it must
not snapshot the model itself. The launcher's handler (and the checkpointing policy's own) only
*request* a checkpoint here; the checkpointing policy (the run's `PreemptionTaker`) saves at the next
step end, stops the run, and marks the request honoured so the launcher can requeue the job.

Why one object per run (`State.preemption`), not module state: a multirun trains several jobs in one
process; a module-level registry once carried one job's policy and group hooks into the next. The
runner creates the channel with the run (or takes the one its launcher offered, see
`greenstack.launch.preemption`) and drops it with the run.

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
from typing import Any, Protocol, runtime_checkable

from greenstack.errors import GreenstackError

#: (this worker's pending signal or None) -> (signal, requesting rank) the group agreed to stop on now
Coordinator = Callable[[int | None], "tuple[int, int] | None"]
#: (state) -> whether a periodic snapshot may be taken at this step end
SnapshotGate = Callable[[Any], bool]


@runtime_checkable
class PreemptionTaker(Protocol):
    """What the channel needs from the policy that saves and stops on a request (checkpointing)."""

    @property
    def pending_signal(self) -> int | None:
        """The signal its own handler caught and has not yet acted on (None: none)."""

    def at_boundary(self, state: Any) -> None:
        """Every worker's state lines up here (a group's round boundary): take a due snapshot now."""

    def preempt(self, state: Any, signum: int, reason: str) -> None:
        """Save and stop now on `signum` (raises the run's `Preempted`)."""


@dataclass
class Preemption:
    """The preemption requests, saves and group hooks of one run (see the module docstring)."""

    requested_signum: int | None = None
    #: where the preemption checkpoint went and at which step, once the taker has saved it
    saved: dict[str, Any] | None = None
    taker: PreemptionTaker | None = None
    coordinator: Coordinator | None = None
    snapshot_gate: SnapshotGate | None = None
    #: a signal the runner's handler turned into `RunInterrupted`; the loop raises it again at the next
    #: step end, in case the first raise landed where Python ignores exceptions (a finaliser, a callback)
    interrupted_signum: int | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def request(self, signum: int) -> None:
        """Ask the training checkpointing policy to save and stop at the next step boundary (signal-safe)."""
        with self._lock:
            if self.requested_signum is None:
                self.requested_signum = signum

    def mark_saved(self, where: str, step: int, signum: int) -> None:
        """Called by the taker once the preemption checkpoint is written."""
        with self._lock:
            self.saved = {"where": where, "step": step, "signal": signal.Signals(signum).name}

    def register(self, taker: PreemptionTaker) -> None:
        """The policy that honours requests is training (from its INIT to FIT_END)."""
        with self._lock:
            self.taker = taker

    def unregister(self, taker: PreemptionTaker) -> None:
        with self._lock:
            if self.taker is taker:
                self.taker = None

    @property
    def honoured(self) -> bool:
        """True while a policy is training that will save at the next step when a request is made."""
        return self.taker is not None

    def coordinate(self, fn: Coordinator | None) -> None:
        """Install (or with None remove) the group's agreement function; see the module docstring."""
        with self._lock:
            self.coordinator = fn

    def gate_snapshots(self, fn: SnapshotGate | None) -> None:
        """Install (or with None remove) a rule for where periodic snapshots may be taken.

        Why: `geo` workers that sit a round out skip its steps, so "every N steps" would save them in
        other rounds than the workers that trained; at round boundaries every worker's state lines up.
        """
        with self._lock:
            self.snapshot_gate = fn

    def snapshot_allowed(self, state: Any) -> bool:
        """Whether a due periodic snapshot may be taken at this step end (deferred to the next allowed one)."""
        gate = self.snapshot_gate
        return True if gate is None else bool(gate(state))

    def at_boundary(self, state: Any) -> None:
        """A group policy reached a point where every worker's state lines up: take a due snapshot now.

        Why: a `geo` worker that sits rounds out runs no step ends for them, so without this call it would
        never reach the round boundaries where the other workers save.
        """
        taker = self.taker
        if taker is not None:
            taker.at_boundary(state)

    def agreed(self, local: int | None) -> tuple[int, int | None] | None:
        """(signal, requesting rank) to preempt on at this step boundary, or None to go on.

        Alone: this worker's own request (rank None). In a group: what the coordinator says all agreed on.
        """
        fn = self.coordinator
        if fn is None:
            return None if local is None else (local, None)
        return fn(local)

    def pending(self) -> int | None:
        """This worker's pending request: the launcher's, or one the taker's own handler caught."""
        if self.requested_signum is not None:
            return self.requested_signum
        taker = self.taker
        signum = taker.pending_signal if taker is not None else None
        return int(signum) if signum is not None else None

    def preempt_now(self, state: Any, signum: int, reason: str) -> None:
        """Have the training checkpointing policy save and stop now (a group's agreed preemption)."""
        taker = self.taker
        if taker is None:
            raise GreenstackError(f"preempted ({reason}) but no checkpointing policy is training to save the run: "
                                  "use checkpointing=hierarchical to resume after preemption")
        taker.preempt(state, signum, reason)

    def end_run(self) -> None:
        """Forget the finished (or failed) run's policy and group hooks; keep `saved` for the launcher."""
        with self._lock:
            self.taker = None
            self.coordinator = None
            self.snapshot_gate = None
