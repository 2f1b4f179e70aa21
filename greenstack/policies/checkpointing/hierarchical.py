"""Hierarchical checkpointing: memory every few steps, local disk less often, a durable store rarely.

The training loop only waits for the in-memory snapshot: buffers, RNG and counters are copied at the
step's end, parameters and optimizer state while the next forward/backward runs (they only change in
the optimizer step, before which the policy waits for the copy). Encoding and writes
to disk or an object store run on background threads, one per slow tier, so a slow store never stalls
training; if a tier is still busy with the previous checkpoint, the new one is skipped for that tier
(and counted). On SIGTERM/SIGUSR1 (Slurm `--signal`, spot notices) the policy writes a checkpoint
synchronously within a time budget and stops the run with exit code 128 + signal; restarting with
`checkpointing.resume=auto` in the same run dir continues bit-for-bit. Requests made through
the run's preemption channel (`State.preemption`, fed by the Slurm launcher's signal handler) are
honoured the same way, and the saved checkpoint is reported back there so the launcher can requeue the job.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Any

from greenstack.checkpoint.codec import CheckpointError, encode
from greenstack.checkpoint.crypto import KEY_ENV, LocalKey
from greenstack.checkpoint.fingerprint import allowed, differences, fingerprint
from greenstack.checkpoint.snapshot import PendingSnapshot, Snapshot, apply_snapshot, capture, capture_async
from greenstack.checkpoint.store import Store
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import Check, ConfigError, GreenstackError, Problem, above, at_least, checked
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1, "SIGINT": signal.SIGINT}


class Preempted(GreenstackError):
    """The run was asked to stop by a signal and saved a checkpoint first."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class _TierWriter:
    """One background thread writing encoded checkpoints to one store, keeping the last `keep`."""

    def __init__(self, name: str, store: Store, keep: int) -> None:
        self.name, self.store, self.keep = name, store, keep
        self._queue: queue.Queue[Snapshot | None] = queue.Queue(maxsize=1)
        self.key: Any = None
        self.written = 0
        self.skipped_busy = 0
        self.errors: list[str] = []
        self.write_s: list[float] = []
        self._thread = threading.Thread(target=self._run, name=f"greenstack-ckpt-{name}", daemon=True)
        self._thread.start()

    def submit(self, snapshot: Snapshot) -> bool:
        try:
            self._queue.put_nowait(snapshot)
            return True
        except queue.Full:
            self.skipped_busy += 1
            return False

    def write_now(self, snapshot: Snapshot) -> None:
        self._write(snapshot)

    def _run(self) -> None:
        while True:
            snapshot = self._queue.get()
            try:
                if snapshot is None:
                    return
                self._write(snapshot)
            finally:
                self._queue.task_done()

    def _write(self, snapshot: Snapshot) -> None:
        t0 = time.perf_counter()
        try:
            bad = next((k for k, t in snapshot.model.items() if t.is_floating_point() and not bool(t.isfinite().all())),
                       None)
            if bad is not None:  # a diverged model is never published: resume keeps the last good checkpoint
                self.errors.append(f"{snapshot.name}: not written, {bad} holds nan/inf (training diverged)")
                log.warning("checkpoint %s not written to %s: weight %s holds nan/inf", snapshot.name, self.name, bad)
                return
            self.store.write(snapshot.name, encode(snapshot, self.key))
            self.written += 1
            for old in self.store.names()[self.keep:]:
                self.store.delete(old)
        except Exception as e:  # a failing tier must not kill training; it is reported
            self.errors.append(f"{snapshot.name}: {type(e).__name__}: {e}")
            log.warning("checkpoint write to %s (%s) failed: %s", self.name, self.store, e)
        self.write_s.append(time.perf_counter() - t0)

    def flush(self, timeout_s: float) -> bool:
        """Wait for pending writes; False if they did not finish within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._queue.unfinished_tasks

    def close(self, timeout_s: float = 60.0) -> None:
        self.flush(timeout_s)
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            pass


#: constraints on the settings (errors.checked)
Every = Annotated[int, at_least(0, integer=True, fix="0 = off")]
Keep = Annotated[int, at_least(1, integer=True)]
RESUME = Check(lambda r: r in ("never", "auto", "required"), "must be never, auto or required",
               "auto: continue from the newest valid checkpoint if there is one")
KNOWN_SIGNALS = Check(lambda names: all(n in SIGNALS for n in names or []), "unknown signal names",
                      f"use {', '.join(SIGNALS)}")


class HierarchicalCheckpointing(Policy):
    """Memory / local / durable checkpoint tiers with async writes, exact resume and preemption handling."""

    role = Role.MODIFIER

    placement = "last"  # a snapshot sees the state after every other policy's STEP_END
    changes_training = False
    audit_kind = "checkpoint"

    events = frozenset({Event.INIT, Event.FIT_START, Event.AFTER_BACKWARD, Event.STEP_END, Event.FIT_END,
                        Event.EXCEPTION})

    @checked("checkpointing")
    def __init__(self, memory_every: Every = 10, memory_keep: Keep = 2, local_every: Every = 100, local_keep: Keep = 3,
                 local_dir: str | None = None, durable_every: Every = 1000, durable_keep: Keep = 2,
                 durable_url: str | None = None, storage_options: dict[str, Any] | None = None,
                 resume: Annotated[str, RESUME] = "never", signals: Annotated[list[str] | None, KNOWN_SIGNALS] = None,
                 preempt_budget_s: Annotated[float, above(0)] = 25.0,
                 encryption: bool = False, key_env: str = KEY_ENV, key_file: str | None = None,
                 spot_notice: bool = False, spot_endpoint: str = "http://169.254.169.254",
                 spot_interval_s: Annotated[float, above(0)] = 5.0, resume_allow_changes: list[str] | None = None) -> None:
        super().__init__(name="checkpointing")
        self.memory_every, self.local_every, self.durable_every = memory_every, local_every, durable_every
        self.memory: deque[Snapshot] = deque(maxlen=memory_keep)
        self.local_keep, self.durable_keep = local_keep, durable_keep
        self.local_dir, self.durable_url, self.storage_options = local_dir, durable_url, storage_options
        self.resume_mode = resume
        #: training-config keys (or group prefixes / globs) that may differ from the checkpoint's on resume
        self.allow_changes = [str(k) for k in resume_allow_changes or []]
        #: the run's training config (`bind_run_config`), saved in every checkpoint and checked on resume
        self.run_config: dict[str, Any] | None = None
        self.signal_names = list(signals if signals is not None else ["SIGTERM", "SIGUSR1"])
        self.preempt_budget_s = preempt_budget_s
        self.key = LocalKey.from_config(key_env, key_file) if encryption else None
        self.tiers: dict[str, _TierWriter] = {}
        self.stall_s: list[float] = []
        self.resumed_from: str | None = None
        self.skipped_on_resume: list[str] = []
        self._signal: int | None = None
        self._checked_step = 0
        self._pending: tuple[PendingSnapshot, list[str], float] | None = None
        self.spot_notice, self.spot_endpoint, self.spot_interval_s = spot_notice, spot_endpoint, spot_interval_s
        self._spot: Any = None
        self._reason = ""
        #: JSON-able record of checkpoints taken, resumes and preemptions (written to the run's audit log)
        self.decisions: list[dict[str, Any]] = []
        self._previous_handlers: dict[int, Any] = {}

    # -- set-up -----------------------------------------------------------------------------------
    def bind_run_config(self, flat: dict[str, Any]) -> None:
        """The run's training config (`greenstack.checkpoint.fingerprint.training_config`); the runner
        calls this so checkpoints record what they are a checkpoint of."""
        self.run_config = dict(flat)

    def _config_meta(self) -> dict[str, Any]:
        if self.run_config is None:
            return {}
        return {"config": self.run_config, "config_sha256": fingerprint(self.run_config)}

    def _check_config(self, snapshot: Snapshot, where: str) -> list[tuple[str, Any, Any]]:
        """Refuse a checkpoint of other training (ConfigError listing every difference); returns the
        allowed differences."""
        saved = snapshot.meta.get("config") if isinstance(snapshot.meta, dict) else None
        if self.run_config is None:
            return []
        if not isinstance(saved, dict):
            log.warning("checkpointing: %s records no training config (older greenstack); not checked", where)
            return []
        diffs = differences(saved, self.run_config)
        refused = [d for d in diffs if not allowed(d[0], self.allow_changes)]
        if refused:
            keys = ",".join(d[0] for d in refused)
            raise ConfigError([Problem(key, now, f"differs from the checkpoint to resume ({where}), trained with "
                                                 f"{old!r}",
                                       f"resume with the checkpoint's value, use a fresh checkpoint location, or "
                                       f"allow it: checkpointing.resume_allow_changes=[{keys}]")
                               for key, old, now in refused])
        for key, old, now in diffs:
            log.warning("checkpointing: resuming with %s = %r (the checkpoint had %r; allowed by "
                        "checkpointing.resume_allow_changes)", key, now, old)
        return diffs

    def _apply_allowed_lr(self, state: State, diffs: list[tuple[str, Any, Any]]) -> None:
        """An allowed change of optim.lr takes effect: the restored schedule continues from the new base."""
        new = next((now for key, _, now in diffs if key == "optim.lr"), None)
        sched = state.lr_scheduler
        if not isinstance(new, (int, float)) or sched is None or state.optimizer is None:
            return
        sched.base_lrs = [float(new) for _ in sched.base_lrs]
        lambdas = getattr(sched, "lr_lambdas", None)
        for i, group in enumerate(state.optimizer.param_groups):
            group["initial_lr"] = float(new)
            factor = lambdas[i](sched.last_epoch) if lambdas else 1.0
            group["lr"] = float(new) * factor

    def _stores(self, state: State) -> dict[str, Store]:
        """The tiers' stores; in a multi-process run each rank keeps its own (`.../rank-N`): workers'
        states differ (data shard, local steps, error memory), and one shared directory would mix them."""
        stores = {}
        local = self.local_dir or (str(Path(state.run_dir) / "checkpoints") if state.run_dir else None)
        durable = self.durable_url
        if state.world_size > 1:
            local = str(Path(local) / f"rank-{state.rank}") if local else None
            durable = f"{durable.rstrip('/')}/rank-{state.rank}" if durable else None
        if local and self.local_every:
            stores["local"] = Store(local)
        if durable and self.durable_every:
            stores["durable"] = Store(durable, self.storage_options)
        return stores

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.INIT:
            stores = self._stores(state)
            keep = {"local": self.local_keep, "durable": self.durable_keep}
            for name, store in stores.items():
                self.tiers[name] = _TierWriter(name, store, keep[name])
                self.tiers[name].key = self.key
            if self.resume_mode != "never":
                self._resume(state, stores, reporter)
            self._checked_step = state.step  # cadences count from here (0, or the resumed step)
            state.preemption.register(self)  # from INIT on: a federated policy may need it from its FIT_START
        elif event is Event.FIT_START:
            self._install_signals()
            if self.spot_notice:
                from greenstack.checkpoint.spot import SpotNoticePoller

                self._spot = SpotNoticePoller(self._on_spot_notice, self.spot_endpoint, self.spot_interval_s).start()
        elif event is Event.AFTER_BACKWARD:
            self._settle(state, reporter)  # the optimizer step is next: the background copy must be done
        elif event is Event.STEP_END:
            self._on_step(state, reporter)
        elif event in (Event.FIT_END, Event.EXCEPTION):
            self._settle(state, reporter)
            self._restore_signals()
            state.preemption.unregister(self)
            if self._spot is not None:
                self._spot.stop()
            for tier in self.tiers.values():
                tier.close()

    def _resume(self, state: State, stores: dict[str, Store], reporter: Reporter) -> None:
        candidates: list[tuple[Snapshot, str]] = []
        any_found = False
        for store in stores.values():
            removed = store.clean_partial()
            if removed:
                log.warning("removed incomplete checkpoint writes in %s: %s", store, ", ".join(removed))
            any_found = any_found or bool(store.names())
            snapshot, name, skipped = store.load_latest(self.key)
            self.skipped_on_resume += skipped
            if snapshot is not None:
                candidates.append((snapshot, f"{store}/{name}"))
        if not candidates:
            if any_found:
                raise CheckpointRefused("checkpoints exist but none is valid: " + "; ".join(self.skipped_on_resume))
            if self.resume_mode == "required":
                raise ConfigError("resume=required but no checkpoint was found",
                                  key="checkpointing.resume", value="required",
                                  fix=f"looked in {', '.join(str(s) for s in stores.values())}")
            log.info("checkpointing: no checkpoint to resume from; starting fresh")
            return
        snapshot, where = max(candidates, key=lambda c: c[0].step)
        allowed_diffs = self._check_config(snapshot, where)  # before anything is loaded into the model
        apply_snapshot(snapshot, state)
        self._apply_allowed_lr(state, allowed_diffs)
        self.resumed_from = where
        self._decided(reporter, {"kind": "checkpoint", "action": "restore", "from": where, "step": snapshot.step,
                                 "skipped": list(self.skipped_on_resume)})
        log.info("checkpointing: resumed from %s (step %d, epoch %d)", where, snapshot.step, snapshot.epoch)

    # -- per step ---------------------------------------------------------------------------------
    def _due(self, every: int, step: int) -> bool:
        """Whether a multiple of `every` was reached since the last open check (steps can jump: geo)."""
        return bool(every) and step // every > self._checked_step // every

    def _on_step(self, state: State, reporter: Reporter | None = None) -> None:
        if self._signal is None and state.preemption.requested_signum is not None:
            self._signal = state.preemption.requested_signum
            self._reason = f"{signal.Signals(self._signal).name} (via the launcher)"
        # with several workers only the group's agreement stops this one (all at the same step)
        agreed = state.preemption.agreed(self._signal)
        if agreed is not None:
            signum, by = agreed
            self.preempt(state, signum, f"{signal.Signals(signum).name} to worker rank {by}, agreed by the group")
        if not state.preemption.snapshot_allowed(state):
            return  # a group's workers save only where their states line up (geo: round boundaries)
        due_local = "local" in self.tiers and self._due(self.local_every, state.step)
        due_durable = "durable" in self.tiers and self._due(self.durable_every, state.step)
        due_memory = self._due(self.memory_every, state.step)
        self._checked_step = state.step
        if not (due_memory or due_local or due_durable):
            return
        self._settle(state, reporter)
        if state.check_finite is not None:
            state.check_finite()  # a diverged run stops here, before its state is captured
        t0 = time.perf_counter()
        pending = capture_async(state, meta={"run_dir": state.run_dir, **_audit_head(state),
                                                   **self._config_meta()})
        tiers = [name for name, due in (("local", due_local), ("durable", due_durable)) if due]
        self._pending = (pending, tiers, time.perf_counter() - t0)

    def _settle(self, state: State, reporter: Reporter | None = None) -> None:
        """Finish the pending snapshot (waiting only for what the background copy has not done yet).

        `reporter` is None when called outside this policy's hooks (a pause, a preemption, a group
        boundary): the stall then goes to the current metrics line through a reporter over `state`."""
        if self._pending is None:
            return
        pending, tiers, sync_s = self._pending
        self._pending = None
        t0 = time.perf_counter()
        snapshot = pending.result()
        stall = sync_s + (time.perf_counter() - t0)
        self.stall_s.append(stall)
        (reporter or Reporter.for_state(state, self.name)).metric("checkpoint/stall_ms", stall * 1000)
        self.memory.append(snapshot)
        queued = []
        for name in tiers:
            tier = self.tiers[name]
            if tier.submit(snapshot):
                queued.append(name)
            elif snapshot.step >= state.max_steps and tier.flush(60.0) and tier.submit(snapshot):
                queued.append(name)  # the run's last checkpoint is worth a wait: later runs resume from it
        self._decided(reporter, {"kind": "checkpoint", "action": "snapshot", "step": snapshot.step,
                                 "stall_ms": round(stall * 1000, 3), "tiers": ["memory", *queued],
                                 "skipped_busy": [name for name in tiers if name not in queued]})

    # -- preemption -------------------------------------------------------------------------------
    def _install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.signal_names:
            signum = SIGNALS[name]
            self._previous_handlers[signum] = signal.signal(signum, self._handler)

    def _restore_signals(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        del frame
        if self._signal is None:
            log.warning("checkpointing: received %s; checkpointing after this step", signal.Signals(signum).name)
        self._signal = signum

    def _on_spot_notice(self, notice: str) -> None:
        self._reason = notice
        self._signal = signal.SIGTERM

    def checkpoint_now(self, state: State, reason: str) -> str:
        """Write a checkpoint synchronously to every tier within `preempt_budget_s`; returns where it went.

        Used for preemption and by other policies (e.g. the scheduler's pause) that need a durable
        point before they stop or wait.
        """
        self._settle(state)
        if state.check_finite is not None:
            state.check_finite()
        t0 = time.monotonic()
        snapshot = capture(state, meta={"run_dir": state.run_dir, "reason": reason, **_audit_head(state),
                                          **self._config_meta()})
        self.memory.append(snapshot)
        saved = []
        for tier in self.tiers.values():
            left = self.preempt_budget_s - (time.monotonic() - t0)
            if left <= 0 or not tier.flush(left):
                continue
            tier.write_now(snapshot)
            saved.append(f"{tier.store}/{snapshot.name}")
        self._decided(None, {"kind": "checkpoint", "action": "checkpoint_now", "reason": reason,
                             "step": snapshot.step, "saved": saved, "seconds": round(time.monotonic() - t0, 3)})
        return ", ".join(saved) or "memory only (no disk tier configured)"

    def at_boundary(self, state: State) -> None:
        """A federated policy's round boundary (see `Preemption.at_boundary`): the step-end checks, now.

        The copy is finished before returning: the caller may change the parameters next (a worker that
        sits the next round out applies its exchange at once), not only the optimizer after a backward.
        """
        self._on_step(state)
        self._settle(state)

    @property
    def pending_signal(self) -> int | None:
        """The signal this policy's own handler caught and has not yet acted on (for a group's agreement)."""
        return self._signal

    def preempt(self, state: State, signum: int, reason: str) -> None:
        """Save and stop now on `signum`; `reason` names it when this worker did not receive it itself."""
        if self._signal is None:
            self._signal, self._reason = signum, reason
        self._preempt(state)

    def _preempt(self, state: State) -> None:
        signum = self._signal or signal.SIGTERM
        cause = self._reason or signal.Signals(signum).name
        t0 = time.monotonic()
        where = self.checkpoint_now(state, f"preempted by {cause}")
        state.preemption.mark_saved(where, state.step, signum)
        raise Preempted(signum, f"preempted by {cause} at step {state.step}: checkpoint saved in "
                                f"{time.monotonic() - t0:.2f} s to {where}; rerun the same command with "
                                f"checkpointing.resume=auto to continue")

    def _decided(self, reporter: Reporter | None, entry: dict[str, Any]) -> None:
        """Keep a decision and report it (no reporter: called outside this policy's hooks, e.g. a pause's
        checkpoint_now; the decision reaches audit.jsonl through `recorded_decisions` at the end)."""
        self.decisions.append(entry)
        if reporter is not None:
            reporter.decision(self.audit_kind, entry)

    def recorded_decisions(self) -> list[dict[str, Any]]:
        return self.decisions

    def state_dict(self) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Figure]:
        figs: dict[str, Figure] = {}
        if self.stall_s:
            figs["checkpoint/stall_ms_median"] = Figure(sorted(self.stall_s)[len(self.stall_s) // 2] * 1000, "ms",
                                                        "measured", "in-memory snapshot time per checkpoint")
        for name, tier in self.tiers.items():
            figs[f"checkpoint/{name}_written"] = Figure(tier.written, "count", "measured", str(tier.store))
            if tier.skipped_busy:
                figs[f"checkpoint/{name}_skipped_busy"] = Figure(tier.skipped_busy, "count", "measured",
                                                                 "previous write still running")
            if tier.write_s:
                figs[f"checkpoint/{name}_write_s_median"] = Figure(sorted(tier.write_s)[len(tier.write_s) // 2],
                                                                   "s", "measured", "background write time")
        if self.resumed_from:
            figs["checkpoint/resumed_from"] = Figure(self.resumed_from, "", "measured", "checkpointing.resume")
        return figs


class CheckpointRefused(CheckpointError, GreenstackError):
    """No checkpoint could be loaded although some exist (tampered, wrong key, corrupt)."""

    exit_code = 3


def _audit_head(state: State) -> dict[str, Any]:
    """`{"audit_head": anchor}` of the run's audit log now (the manifest keeps it: a later cut shows)."""
    if not state.run_dir:
        return {}
    from greenstack.ledger.audit import RUN_AUDIT_FILE, current_anchor

    try:
        anchor = current_anchor(Path(state.run_dir) / RUN_AUDIT_FILE)
    except (OSError, ValueError, KeyError):
        return {}  # an unreadable log is audit verify's to report, not a reason to skip a checkpoint
    return {"audit_head": anchor} if anchor else {}
