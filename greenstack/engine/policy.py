"""Policy base class: a plain object that acts on `State` at a few events.

A policy declares the events it handles (`events`), may limit itself to an active window
(`start`/`end` as duration strings), validates its arguments when constructed (raising
ConfigError), and round-trips its own state through `state_dict`/`load_state_dict` so a resumed
run resumes the policy too. Policies never know about one another.

Each policy class declares its `role`: a MODIFIER changes training (AMP, pruning, QAT, distillation,
federated averaging, batch-size search, schedulers that pause or delay, checkpoint restore); an
OBSERVER measures and records (the report clock, the meters, determinism, pool allocation, alerts,
early stopping) and asks for changes only through typed requests (`state.requests`, `request_stop`).
The Trainer owns the order (`dispatch_order`, see greenstack/engine/loop.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar

from greenstack.engine.duration import Duration
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError

if TYPE_CHECKING:
    from greenstack.scheduling.decisions import DecisionRecorder

log = logging.getLogger("greenstack")
#: where a policy goes in dispatch order (engine/groups.py): `start` = start-time schedulers, built and run
#: before anything else; `any` = config order; `last` = after every other policy (checkpointing)
PLACEMENTS = ("start", "any", "last")


class Role(str, Enum):
    """What a policy does to a run: change training, or only measure and record it."""

    MODIFIER = "modifier"
    OBSERVER = "observer"


#: events that open a phase (observers go first so they see every modifier's set-up work); on every
#: other event (after_*, *_end, checkpoint, exception) modifiers go first and observers see their result
OPENING_EVENTS = frozenset({Event.INIT, Event.FIT_START, Event.EPOCH_START, Event.BATCH_START})


class Policy:
    """Base class for everything the loop dispatches events to.

    Besides the hook, a policy may override these declared methods (the engine and the run call them on
    every policy; the defaults do nothing): `bind_run_config`, `restore_model`, `replay`, `checkpoint_now`,
    `energy_monitor`, `region_report`, `recorded_decisions`, `decision_recorder`. Nothing else about a
    policy is probed.
    """

    events: ClassVar[frozenset[Event]] = frozenset()
    #: audit.jsonl `kind` of this policy's decisions (a decision whose `action` is pause/resume/arm or
    #: choose_region is filed as `pause` or `region` instead)
    audit_kind: ClassVar[str] = "decision"
    #: events dispatched even outside the active window (set-up and tear-down)
    always: ClassVar[frozenset[Event]] = frozenset({Event.INIT, Event.FIT_START, Event.FIT_END,
                                                    Event.EXCEPTION})
    #: one of PLACEMENTS
    placement: ClassVar[str] = "any"
    #: MODIFIER or OBSERVER (every policy class declares it; an undeclared one counts as a modifier)
    role: ClassVar[Role] = Role.MODIFIER
    #: whether its config is part of the training config a checkpoint must match on resume (fingerprint)
    changes_training: ClassVar[bool] = True
    #: a start-time scheduler whose start window a batch launcher can plan at submit time (sbatch --begin)
    plans_at_submit: ClassVar[bool] = False

    def __init__(self, start: str | int | None = None, end: str | int | None = None,
                 name: str | None = None) -> None:
        self.name = name or type(self).__name__
        self.start = Duration.parse(start, key=f"{self.name}.start") if start is not None else None
        self.end = Duration.parse(end, key=f"{self.name}.end") if end is not None else None
        self._start_step = 0
        self._end_step: int | None = None

    def resolve_window(self, state: State) -> None:
        """Turn the window's durations into step indices once the loop knows its length."""
        kw = {"steps_per_epoch": state.steps_per_epoch, "total_steps": state.max_steps,
              "batch_size": state.batch_size}
        self._start_step = self.start.to_steps(**kw) if self.start else 0
        self._end_step = self.end.to_steps(**kw) if self.end else None
        if self._end_step is not None and self._end_step < self._start_step:
            raise ConfigError(f"end ({self.end}) comes before start ({self.start})", key=f"{self.name}.end",
                              value=str(self.end), fix="make `end` later than `start`")

    def active(self, state: State) -> bool:
        """Whether the current step is inside the policy's window."""
        return state.step >= self._start_step and (self._end_step is None or state.step < self._end_step)

    def handles(self, event: Event, state: State) -> bool:
        if event not in self.events:
            return False
        return event in self.always or self.active(state)

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:  # pragma: no cover - interface
        """Act on `event`: read and change `state`, report metrics and decisions to `reporter`; override."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state

    def summary(self) -> dict[str, Any]:
        """Figures this policy wants in sustainability.json (name -> Figure or plain value)."""
        return {}

    # -- declared optional hooks (defaults: nothing) -----------------------------------------------
    def bind_run_config(self, flat: dict[str, Any]) -> None:
        """The run's flat training config, given before training (checkpoints record it; resume checks it)."""
        del flat

    def restore_model(self, state: State) -> None:
        """After policy states are restored from a snapshot: rebuild the model's structure as it was when
        the snapshot was taken (QAT's fake-quant modules, a distilled student) so its weights fit."""
        del state

    def replay(self, entries: list[dict[str, Any]], source: str) -> bool:
        """Take the decisions a recorded run made (`efficiency.decisions_from`); True when taken."""
        del entries, source
        return False

    def checkpoint_now(self, state: State, reason: str) -> str | None:
        """Write a checkpoint now (e.g. before a pause); where it went, or None when this policy does not
        checkpoint."""
        del state, reason
        return None

    def energy_monitor(self) -> Any | None:
        """The running energy monitor this policy owns (the measurement policy), else None."""
        return None

    def region_report(self) -> dict[str, Any] | None:
        """Per-region figures of a geo-distributed run for sustainability.json, else None."""
        return None

    def recorded_decisions(self) -> list[dict[str, Any]]:
        """This policy's decisions so far, written to audit.jsonl at the end of the run unless its
        `decision_recorder()` already wrote them as they were taken."""
        return []

    def decision_recorder(self) -> DecisionRecorder | None:
        """A recorder that forwards each decision as it is taken (the audit log listens to it), else None."""
        return None


def dispatch_order(policies: Sequence[Policy], event: Event) -> list[Policy]:
    """The order policies see `event` (Composer's rule, adapted; the engine applies it, configs cannot):

    1. on an opening event (INIT, FIT_START, EPOCH_START, BATCH_START) observers, then modifiers; on every
       other event modifiers, then observers: observers wrap modifiers (the clock and the meters start
       before a modifier's set-up work and stop after its tear-down; alerts read the meters' figures of
       the same step);
    2. policies placed `last` (checkpointing) after both, on every event: a snapshot sees the state
       after every other policy's STEP_END, and a restore at INIT comes after every modifier set up;
    3. within a tier, the declared (config) order, also on after_*/end events: reversing it would run
       checkpointing's STEP_END before the policies it must see, so the nesting is by role, not by index.
    """
    last = [p for p in policies if p.placement == "last"]
    rest = [p for p in policies if p.placement != "last"]
    modifiers = [p for p in rest if p.role is not Role.OBSERVER]
    observers = [p for p in rest if p.role is Role.OBSERVER]
    first, then = (observers, modifiers) if event in OPENING_EVENTS else (modifiers, observers)
    return [*first, *then, *last]
