"""compose -> validate -> instantiate -> loop -> report. Deliberately short: the work is elsewhere."""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from greenstack.checkpoint.fingerprint import training_config
from greenstack.data.cache_ledger import attach_prepare_share
from greenstack.engine.determinism import Determinism, seed_loaders
from greenstack.engine.groups import policy_nodes
from greenstack.engine.loop import Trainer
from greenstack.engine.policy import Policy
from greenstack.engine.replay import apply_replay, load_decisions
from greenstack.errors import ConfigError, RunInterrupted
from greenstack.federated import launch as federated
from greenstack.launch import preemption
from greenstack.ledger.allocation import PoolAllocation
from greenstack.ledger.audit import anchor_run, attach_to_recorders, record_policy_decisions, run_audit_log
from greenstack.measure import Measurement
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


def run(cfg: DictConfig, run_dir: str | Path, *, spawned_worker: bool = False) -> dict[str, Any]:
    """Train one job described by `cfg`, writing every output into `run_dir`. Returns the summary.

    `spawned_worker`: this process is a worker `federated.spawn` started (its failure is noted for it).
    """
    problems = validate_config(cfg)
    if problems:
        raise ConfigError(problems)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if federated.wants_spawn(cfg):  # several workers asked for and no launcher around: start them here
        return federated.spawn(cfg, run_dir)
    worker = federated.join(cfg)  # None unless federated=ddp/geo
    # this run's preemption channel (the launcher's, when one offered it): dropped with the run
    channel = preemption.take()
    finished = False
    determinism = Determinism(cfg.trainer.get("deterministic", False))
    try:
        # determinism before anything touches the device (CUBLAS_WORKSPACE_CONFIG)
        with _sigterm_raises(), determinism.applied():
            summary = _run(cfg, run_dir, worker, determinism, channel)
        finished = True
        return summary
    except BaseException as e:
        if worker is not None and spawned_worker:
            federated.mark_failure(run_dir, worker.rank, e)  # before leaving the group: peers fail next
        raise
    finally:
        channel.end_run()  # the policies' hooks must not outlive the run; `saved` stays for the launcher
        if worker is not None:
            worker.close(finished=finished)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises `RunInterrupted` in the main thread, so the run ends through its finalisation
    (partial accounting) instead of dying silently. Only where nobody else handles SIGTERM (a launcher,
    a checkpointing policy installs its own); a second SIGTERM while finalising is ignored."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    raised: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        del frame
        if not raised:
            raised.append(signum)
            raise RunInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def end_status(error: BaseException) -> str:
    """How a run that raised ended: `interrupted` (a signal, Ctrl-C, a preemption) or `failed`."""
    from greenstack.policies.checkpointing.hierarchical import Preempted

    return "interrupted" if isinstance(error, (KeyboardInterrupt, Preempted)) else "failed"


def _run(cfg: DictConfig, run_dir: Path, worker: federated.WorkerContext | None,
         determinism: Determinism, channel: preemption.Preemption) -> dict[str, Any]:
    rank = worker.rank if worker is not None else int(os.environ.get("RANK", "0") or 0)
    run_id = load_or_create_run_id(run_dir) if worker is None else federated.shared_run_id(run_dir, worker)
    audit = run_audit_log(run_dir, actor=f"run {run_id}")
    submitted_at = datetime.now(timezone.utc)  # before any scheduler wait: the `submission` savings baseline
    # when to start is decided before anything is built: a run waiting for its low-carbon window holds
    # no model, data or device memory and shows no half-started tracker run
    schedulers = build_policies(cfg, start=True)
    source = (cfg.get("efficiency") or {}).get("decisions_from")
    recorded = load_decisions(source) if source else None  # efficiency.decisions_from: replay that run's choices
    apply_replay(recorded, schedulers)
    attach_to_recorders(audit, schedulers)  # scheduler decisions go to audit.jsonl as they are taken
    carried = start_when_scheduled(schedulers, run_dir)
    seed_everything(int(cfg.seed))
    data = instantiate(cfg.data, seed=int(cfg.seed))
    attach_prepare_share(data, run_id=run_id, run_dir=run_dir)  # a prepared cache: its share of the prepare job
    if determinism.enabled:
        seed_loaders([data.train, data.val, data.test], int(cfg.seed))
    model = instantiate(cfg.model, num_classes=data.num_classes, in_chans=data.in_chans)
    if worker is not None:  # every worker trains on its own disjoint shard
        data.train = federated.shard_loader(data.train, worker.rank, worker.world_size)
    task = instantiate(cfg.task) if cfg.get("task") is not None else None  # None: classification
    optim = instantiate(cfg.optim)
    trainer_cfg = instantiate(cfg.trainer)
    policies = [determinism, *schedulers, *build_policies(cfg, start=False)]
    apply_replay(recorded, policies[1 + len(schedulers):])
    flat = training_config(cfg)
    for policy in policies:  # checkpoints record the training config they belong to; resume checks it
        policy.bind_run_config(flat)
    attach_to_recorders(audit, policies)
    run_name = cfg.get("run_name") or run_dir.name
    tracker = instantiate(cfg.tracker) if rank == 0 else NullTracker()
    carbon = instantiate(cfg.carbon, **(worker.carbon_override() if worker is not None else {}))
    measurement = Measurement(instantiate(cfg.energy), carbon, log_interval=trainer_cfg.log_interval,
                              submitted_at=submitted_at)
    # None without carbon.pool; one reservation per run, so only rank 0 of a multi-process run asks
    pool = PoolAllocation.for_run(carbon, run_id=run_id, audit=audit) if rank == 0 else None
    if pool is not None:
        pool.reserve_before_training()  # a denial raises PoolDenied (exit 3) before anything spins up
        policies.append(pool)
    report = RunReport(cfg, run_dir=run_dir, run_id=run_id, measurement=measurement)
    jsonl = JsonlWriter(run_dir) if rank == 0 else federated.NullSink()
    exit_code = 1
    trainer: Trainer | None = None
    tracker.start(run_dir=run_dir, run_id=run_id, run_name=str(run_name),
                  config=redact(OmegaConf.to_container(cfg, resolve=True)))  # secrets stay in memory
    try:
        trainer = Trainer(model, data.train, optim, trainer_cfg, val_loader=data.val, test_loader=data.test,
                          policies=[*report.policies(), *policies, carried], sinks=[Fanout(jsonl, tracker)],
                          batch_size=data.batch_size, run_dir=str(run_dir), task=task, preemption=channel)
        state = trainer.fit()
        say = log.info if trainer_cfg.progress and rank == 0 else log.debug  # the minute after the last step
        say("measuring the run's figures (energy, carbon, model size, FLOPs, inference latency)")
        summary = report.finish(state, trainer=trainer, data=data, policies=policies)
        if pool is not None:
            pool.settle(summary["flat"].get("carbon/total_kg_co2e"))
        if measurement.budget_decision is not None:
            audit.append("budget", measurement.budget_decision)
        say("writing report.html and its plots")
        finish_run_report(run_dir, tracker)  # report.html + plots/ (+ W&B media); never fails the run
        tracker.summary(summary["flat"])
        say("closing the %s tracker", getattr(tracker, "name", "") or "run's")
        exit_code = 0
        return summary
    except BaseException as e:  # the single end of every run that did not finish: its partial accounting
        reason = str(e) or type(e).__name__
        if isinstance(e, KeyboardInterrupt) and not isinstance(e, RunInterrupted):
            reason = "interrupted by SIGINT"
        written = report.finish_partial(trainer.state if trainer is not None else None, status=end_status(e),
                                        reason=reason.splitlines()[0], policies=policies)
        if written is not None and isinstance(e, KeyboardInterrupt):
            e.reported = True  # type: ignore[attr-defined] # the CLI's "interrupted" line is said already
        raise
    finally:
        record_policy_decisions(audit, policies,  # efficiency/alert/compression decisions, also of a failed run
                                reported=trainer.decisions if trainer is not None else None)
        if pool is not None:
            pool.close()  # a failed run settles what it logged so far
        try:  # the final head, copied where cutting the log's tail shows (`greenstack audit verify`)
            anchor_run(run_dir, audit, tracker)
        except Exception as e:  # never mask the run's own outcome
            log.warning("could not anchor the audit log's head: %s", e)
        jsonl.close()
        report.close()
        tracker.finish(exit_code=exit_code)
