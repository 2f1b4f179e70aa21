"""One training run as a recipe in phases: plan_start -> setup -> fit -> report -> cleanup.

The work is elsewhere (engine, policies, report); this module only orders it. `run` checks the
config (unless its caller did), starts federated workers when asked, and drives a `TrainRecipe`
with the run's `RunContext` (what exists once per run and is dropped with it).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from greenstack.checkpoint.fingerprint import training_config
from greenstack.data.cache_ledger import attach_prepare_share
from greenstack.engine.audit_trail import attach_to_recorders, record_policy_decisions
from greenstack.engine.determinism import Determinism, seed_loaders
from greenstack.engine.groups import policy_nodes
from greenstack.engine.loop import Trainer
from greenstack.engine.policy import Policy
from greenstack.engine.preemption import Preemption
from greenstack.engine.replay import apply_replay, load_decisions
from greenstack.engine.state import State
from greenstack.errors import ConfigError, RunInterrupted
from greenstack.federated import launch as federated
from greenstack.launch import preemption
from greenstack.ledger.audit import anchor_run, run_audit_log
from greenstack.measure import Measurement
from greenstack.policies.pool_allocation import PoolAllocation
from greenstack.policies.scheduler._base import start_when_scheduled
from greenstack.report.html import finish_run_report
from greenstack.report.summary import RunReport
from greenstack.secrets import redact
from greenstack.tracking.base import Fanout, JsonlWriter, NullTracker, load_or_create_run_id
from greenstack.validate import validate_config

log = logging.getLogger("greenstack")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_policies(cfg: DictConfig, groups: Iterable[str] | None = None, *,
                   start: bool | None = None) -> list[Policy]:
    """The policies of `groups` (default: every policy group the config holds, engine/groups.py) in
    dispatch order. start=True: only the start-time schedulers; False: all but them."""
    policies: list[Policy] = []
    for found in policy_nodes(cfg, groups):
        if start is not None and (found.placement == "start") != start:
            continue
        policy = instantiate(found.node)
        if not isinstance(policy, Policy):
            raise ConfigError(f"{found.node._target_} is not a greenstack Policy", key=found.key)
        policies.append(policy)
    return policies


def run(cfg: DictConfig, run_dir: str | Path, *, spawned_worker: bool = False,
        validated: bool = False) -> dict[str, Any]:
    """Train one job described by `cfg`, writing every output into `run_dir`. Returns the summary.

    `validated`: the caller already checked this very config (`greenstack train`'s pre-flight), so it is
    not checked twice. `spawned_worker`: this process is a worker `federated.spawn` started (its failure
    is noted for it).
    """
    if not validated:
        problems = validate_config(cfg)
        if problems:
            raise ConfigError(problems)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if federated.wants_spawn(cfg):  # several workers asked for and no launcher around: start them here
        return federated.spawn(cfg, run_dir, worker_main)
    context = RunContext(run_dir=run_dir, worker=federated.join(cfg),  # worker: None unless federated=ddp/geo
                         preemption=preemption.take(), spawned_worker=spawned_worker)
    try:
        summary = TrainRecipe(cfg, context).run()
        context.finished = True
        return summary
    except BaseException as e:
        if context.worker is not None and spawned_worker:
            federated.mark_failure(run_dir, context.worker.rank, e)  # before leaving the group: peers fail next
        raise
    finally:
        context.close()


def worker_main(container: dict[str, Any], run_dir: str) -> dict[str, Any] | None:
    """Entry point of a spawned worker: the normal run path; only rank 0 returns the summary."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_worker)(container, run_dir)


def _worker(container: dict[str, Any], run_dir: str) -> dict[str, Any] | None:
    from omegaconf import OmegaConf

    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(message)s")
    if rank != 0:  # one voice per run: other ranks report warnings and errors only
        logging.getLogger("greenstack").setLevel(logging.WARNING)
    else:  # the run's train.log (Hydra's, opened by the launching process) gets rank 0's lines too
        handler = logging.FileHandler(Path(run_dir) / "train.log", encoding="utf-8")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - [rank 0] %(message)s"))
        logging.getLogger().addHandler(handler)
    # spawned: failures are noted for `spawn` (mark_failure); an external launcher has its own report;
    # validated: `spawn` runs inside the parent's `run`, after its config was checked
    summary = run(OmegaConf.create(container), run_dir, spawned_worker=True, validated=True)
    if rank != 0:
        return None
    return {k: v for k, v in summary.items() if k in ("run_id", "metrics", "flat", "stopped_early")}


@contextmanager
def _signals_raise(channel: Preemption) -> Iterator[None]:
    """SIGTERM (and Ctrl-C's SIGINT) raise `RunInterrupted` in the main thread, so the run ends through
    its finalisation (partial accounting) instead of dying silently. Only where nobody else handles the
    signal (a launcher, a checkpointing policy installs its own SIGTERM handler). The signal is also left
    on the run's `channel`, where the loop finds it at the next step end if this raise was swallowed.
    While finalising, a second SIGTERM is ignored; a second Ctrl-C interrupts as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    defaults = {signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler}
    ours = [s for s, default in defaults.items() if signal.getsignal(s) is default]
    raised: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        del frame
        if not raised:
            raised.append(signum)
            channel.interrupted_signum = signum
            raise RunInterrupted(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in ours}
    try:
        yield
    finally:
        for s, handler_before in previous.items():
            signal.signal(s, handler_before)


def end_status(error: BaseException) -> str:
    """How a run that raised ended: `interrupted` (a signal, Ctrl-C, a preemption) or `failed`."""
    from greenstack.policies.checkpointing.hierarchical import Preempted

    return "interrupted" if isinstance(error, (KeyboardInterrupt, Preempted)) else "failed"


@dataclass
class RunContext:
    """What exists once per run (per job of a multirun) and is dropped with it.

    Why an object: a multirun trains several jobs in one process, and anything kept in a module would
    carry one job's state (a preemption request, a checkpointing policy, a group hook) into the next.
    """

    run_dir: Path
    #: this process's place in a federated run (None: a single process)
    worker: federated.WorkerContext | None = None
    #: this run's preemption channel (the launcher's, when it offered one); also `State.preemption`
    preemption: Preemption = field(default_factory=Preemption)
    #: this process is a worker `federated.spawn` started
    spawned_worker: bool = False
    finished: bool = False

    @property
    def rank(self) -> int:
        return self.worker.rank if self.worker is not None else int(os.environ.get("RANK", "0") or 0)

    def close(self) -> None:
        """The run is over: its policies' hooks go (`saved` stays for the launcher); leave the group."""
        self.preemption.end_run()
        if self.worker is not None:
            self.worker.close(finished=self.finished)


class TrainRecipe:
    """One training run in phases: plan_start -> setup -> fit -> report, and cleanup whatever happened.

    Each phase has one job and leaves what it built on the recipe for the next; `cleanup` closes only
    what was opened, so it is safe after a failure in any phase. A run that fails after its tracker
    started writes its partial accounting first (`report_partial`).
    """

    def __init__(self, cfg: DictConfig, context: RunContext) -> None:
        self.cfg, self.context = cfg, context
        self.run_dir = context.run_dir
        self.determinism = Determinism(cfg.trainer.get("deterministic", False))
        self.exit_code = 1
        self.started = False  # the tracker run is open: from here on a failure writes partial accounting
        self.schedulers: list[Policy] = []
        self.policies: list[Policy] = []
        self.pool: PoolAllocation | None = None
        self.report: RunReport | None = None
        self.trainer: Trainer | None = None
        self.jsonl: Any = None
        self.tracker: Any = None

    def run(self) -> dict[str, Any]:
        """Every phase in order; cleanup runs after a failure in any of them."""
        # determinism before anything touches the device (CUBLAS_WORKSPACE_CONFIG)
        with _signals_raise(self.context.preemption), self.determinism.applied():
            try:
                self.plan_start()
                self.setup()
                state = self.fit()
                summary = self.report_phase(state)
                self.exit_code = 0
                return summary
            except BaseException as e:
                self.report_partial(e)
                raise
            finally:
                self.cleanup()

    # -- phases ------------------------------------------------------------------------------------
    def plan_start(self) -> None:
        """When to start, decided before anything is built: a run waiting for its low-carbon window holds
        no model, data or device memory and shows no half-started tracker run."""
        ctx = self.context
        self.run_id = load_or_create_run_id(self.run_dir) if ctx.worker is None \
            else federated.shared_run_id(self.run_dir, ctx.worker)
        self.audit = run_audit_log(self.run_dir, actor=f"run {self.run_id}")
        self.submitted_at = datetime.now(timezone.utc)  # before any wait: the `submission` savings baseline
        self.schedulers = build_policies(self.cfg, start=True)
        source = (self.cfg.get("efficiency") or {}).get("decisions_from")
        self.recorded = load_decisions(source) if source else None  # replay that run's choices
        apply_replay(self.recorded, self.schedulers)
        attach_to_recorders(self.audit, self.schedulers)  # scheduler decisions go to audit.jsonl as taken
        self.carried = start_when_scheduled(self.schedulers, self.run_dir)

    def setup(self) -> None:
        """Build data, model, policies, meters, tracker and the Trainer (in the order they depend on)."""
        cfg, ctx = self.cfg, self.context
        seed = int(cfg.seed)
        seed_everything(seed)
        data = self.data = instantiate(cfg.data, seed=seed)
        attach_prepare_share(data, run_id=self.run_id, run_dir=self.run_dir)  # a prepared cache's share
        if self.determinism.enabled:
            seed_loaders([data.train, data.val, data.test], seed)
        model = instantiate(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans)
        if ctx.worker is not None:  # every worker trains on its own disjoint shard
            data.train = federated.shard_loader(data.train, ctx.worker.rank, ctx.worker.world_size)
        task = instantiate(cfg.task) if cfg.get("task") is not None else None  # None: classification
        optim = instantiate(cfg.optim)
        self.trainer_cfg = instantiate(cfg.trainer)
        rest = build_policies(cfg, start=False)
        apply_replay(self.recorded, rest)
        self.policies = [self.determinism, *self.schedulers, *rest]
        flat = training_config(cfg)
        for policy in self.policies:  # checkpoints record the training config they belong to; resume checks it
            policy.bind_run_config(flat)
        attach_to_recorders(self.audit, self.policies)
        rank = ctx.rank
        tracker = instantiate(cfg.tracker) if rank == 0 else NullTracker()
        carbon = instantiate(cfg.carbon, **(ctx.worker.carbon_override() if ctx.worker is not None else {}))
        self.measurement = Measurement(instantiate(cfg.energy), carbon, log_interval=self.trainer_cfg.log_interval,
                                       submitted_at=self.submitted_at)
        # None without carbon.pool; one reservation per run, so only rank 0 of a multi-process run asks
        pool = PoolAllocation.for_run(carbon, run_id=self.run_id, audit=self.audit) if rank == 0 else None
        if pool is not None:
            pool.reserve_before_training()  # a denial raises PoolDenied (exit 3) before anything spins up
            self.pool = pool
            self.policies.append(pool)
        self.report = RunReport(cfg, run_dir=self.run_dir, run_id=self.run_id, measurement=self.measurement)
        self.jsonl = JsonlWriter(self.run_dir, keep_rows=True) if rank == 0 else federated.NullSink()
        tracker.start(run_dir=self.run_dir, run_id=self.run_id, run_name=str(cfg.get("run_name") or self.run_dir.name),
                      config=redact(OmegaConf.to_container(cfg, resolve=True)))  # secrets stay in memory
        self.tracker, self.started = tracker, True
        self.trainer = Trainer(model, data.train, optim, self.trainer_cfg, val_loader=data.val, test_loader=data.test,
                               policies=[*self.report.policies(), *self.policies, self.carried],
                               sinks=[Fanout(self.jsonl, tracker)], batch_size=data.batch_size,
                               run_dir=str(self.run_dir), task=task, preemption=ctx.preemption)

    def fit(self) -> State:
        assert self.trainer is not None
        return self.trainer.fit()

    def report_phase(self, state: State) -> dict[str, Any]:
        """The run's figures, sustainability.json, the pool's settlement and report.html."""
        assert self.report is not None and self.trainer is not None
        say = log.info if self.trainer_cfg.progress and self.context.rank == 0 else log.debug
        say("measuring the run's figures (energy, carbon, model size, FLOPs, inference latency)")
        summary = self.report.finish(state, trainer=self.trainer, data=self.data, policies=self.policies)
        if self.pool is not None:
            self.pool.settle(summary["flat"].get("carbon/total_kg_co2e"))
        if self.measurement.budget_decision is not None:
            self.audit.append("budget", self.measurement.budget_decision)
        say("writing report.html and its plots")
        # report.html + plots/ (+ W&B media) from what this run holds in memory; never fails the run
        finish_run_report(self.run_dir, self.tracker, summary=self.report.summary_json,
                          metrics=self.jsonl.rows if isinstance(self.jsonl, JsonlWriter) else None)
        self.tracker.summary(summary["flat"])
        say("closing the %s tracker", getattr(self.tracker, "name", "") or "run's")
        return summary

    def report_partial(self, error: BaseException) -> None:
        """The single end of every run that did not finish once its tracker started: partial accounting."""
        if not self.started or self.report is None:
            return
        reason = str(error) or type(error).__name__
        if isinstance(error, KeyboardInterrupt) and not isinstance(error, RunInterrupted):
            reason = "interrupted by SIGINT"
        written = self.report.finish_partial(self.trainer.state if self.trainer is not None else None,
                                             status=end_status(error), reason=reason.splitlines()[0],
                                             policies=self.policies)
        if written is not None and isinstance(error, KeyboardInterrupt):
            error.reported = True  # type: ignore[attr-defined] # the CLI's "interrupted" line is said already

    def cleanup(self) -> None:
        """Close what the phases opened (also after a failure in any of them), in reverse order."""
        if self.started:
            # efficiency/alert/compression decisions (and those reported through the loop), also of a failed run
            record_policy_decisions(self.audit, self.policies,
                                    reported=self.trainer.decisions if self.trainer is not None else None)
        if self.pool is not None:
            self.pool.close()  # a failed run settles what it logged so far
        if self.started:
            try:  # the final head, copied where cutting the log's tail shows (`greenstack audit verify`)
                anchor_run(self.run_dir, self.audit, self.tracker)
            except Exception as e:  # never mask the run's own outcome
                log.warning("could not anchor the audit log's head: %s", e)
        if self.jsonl is not None:
            self.jsonl.close()
        if self.report is not None:
            self.report.close()
        if self.started:
            self.tracker.finish(exit_code=self.exit_code)
