"""`greenstack data prepare`: tokenisation as its own measured, schedulable job, whose cache training reuses.

Why a job of its own (the seed's "preprocess in low-carbon regions"): a corpus is tokenised once and
every training run and sweep job afterwards reads the cache. As a job, that work is metered by the
objects a training run uses (`TrackedRun`: `Measurement`, the energy meters, hour-by-hour carbon
accounting, `RunReport`), can wait for a low-carbon window or pick a region with the same `scheduler`
options and start-time logic (`start_when_scheduled`), and writes its own run dir (sustainability.json,
emissions.csv, audit.jsonl, report.html). The cache is the very file the data builder writes, so a
`greenstack train` with the same `data` config finds it.

Its figures go into the ledger next to the cache (`greenstack.data.cache_ledger`), from which training
runs that read the cache report their amortised share. Why a top-level module and not `data/`: the job
sits above the run machinery it uses (TrackedRun, validate), which the data layer must not import.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from greenstack.data.cache_ledger import (
    PREPARE_FIGURES,
    append_record,
    latest_prepare,
    ledger_path,
    read_ledger,
)
from greenstack.data.lm import CachePlan
from greenstack.errors import ConfigError, Problem
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")
#: the config keys a prepare job uses (the rest of the training config may be given, and is ignored)
KEYS = ("data", "carbon", "energy", "scheduler", "project", "run_name", "seed")


# -- planning and running the job --------------------------------------------------------------------
def _target(node: Any) -> str:
    return str(node.get("_target_", "")) if isinstance(node, (dict, DictConfig)) else ""


def _instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate`, raising the builder's own error (a ConfigError says what/where/fix) instead of
    Hydra's InstantiationException around it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        if isinstance(cause, Exception):
            raise cause from None
        raise


def plan_cache(data: DictConfig) -> CachePlan:
    """Where `data`'s tokenisation cache lives and whether it exists, without tokenising anything."""
    from hydra.utils import get_method

    target = _target(data)
    try:
        builder = get_method(target)
    except Exception:  # noqa: BLE001 - validate reports an unknown target; say it here too
        builder = None
    if builder is None or "cache_only" not in inspect.signature(builder).parameters:
        raise ConfigError("this data set has no tokenisation cache to prepare", key="data._target_", value=target,
                          fix="use data=hf_local or data=python_stdlib (or a builder taking cache_only='plan'|'build'); "
                              "data=stream tokenises while it streams")
    plan = _instantiate(data, cache_only="plan")
    if not isinstance(plan, CachePlan):
        raise ConfigError(f"{target}(cache_only='plan') returned {type(plan).__name__}, not a CachePlan",
                          key="data._target_", value=target)
    return plan


def compose_prepare(overrides: Sequence[str]) -> tuple[DictConfig, Path]:
    """The job's config (`data`, `carbon`, `energy`, `scheduler`, ... composed like `greenstack train`'s,
    the same overrides allowed) and its run dir (`hydra.run.dir=...`, default outputs/data-prepare/DATE/TIME).

    Raises ConfigError listing every problem, before anything is written.
    """
    from greenstack.compose import compose_with_problems
    from greenstack.tracked import START_SCHEDULERS
    from greenstack.validate import validate_config

    cfg, problems = compose_with_problems(list(overrides), return_hydra_config=True)
    if cfg is None:
        raise ConfigError(problems)
    choices = OmegaConf.select(cfg, "hydra.runtime.choices") or {}
    scheduler = choices.get("scheduler")
    if scheduler is not None and scheduler not in START_SCHEDULERS:
        problems.append(Problem("scheduler", scheduler, "needs a training loop to pause; a prepare job decides "
                                "its start once", f"use one of {', '.join(START_SCHEDULERS)}"))
    # task/model matter only when given (then a mismatch with the data is reported as for train); a
    # prepare job without them must not be held to the default task's expectations
    explicit = any(o.split("=", 1)[0].lstrip("+~") in ("task", "model", "recipe") for o in overrides)
    checked = OmegaConf.masked_copy(cfg, [k for k in (*KEYS, *(("task", "model") if explicit else ())) if k in cfg])
    problems += [p for p in validate_config(checked) if explicit or not p.reason.startswith("task=")]
    body = OmegaConf.masked_copy(cfg, [k for k in KEYS if k in cfg])
    if problems:
        seen: set[tuple[str, str, str]] = set()
        raise ConfigError([p for p in problems if (p.key, str(p.value), p.reason) not in seen
                           and not seen.add((p.key, str(p.value), p.reason))])  # type: ignore[func-returns-value]
    given = next((o.split("=", 1)[1] for o in overrides if o.startswith("hydra.run.dir=")), None)
    return body, Path(given) if given else _fresh_run_dir(datetime.now(timezone.utc))


def _fresh_run_dir(now: datetime) -> Path:
    """outputs/data-prepare/DATE/TIME, with -1, -2, ... when a job started in the same second (two jobs
    must not share a run id)."""
    base = Path("outputs") / "data-prepare" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    run_dir, n = base, 0
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    return run_dir


@dataclass
class PrepareResult:
    """What a prepare job did: `prepared` (tokenised and recorded), or a no-op with the reason."""

    plan: CachePlan
    prepared: bool
    reason: str
    run_dir: Path | None = None
    summary: dict[str, Any] | None = None
    prepared_by: dict[str, Any] | None = None
    duration_s: float = 0.0


def prepare(cfg: DictConfig, run_dir: str | Path, *, clock: Callable[[], float] | None = None,
            sleep: Callable[[float], None] | None = None, meters: list[Any] | None = None) -> PrepareResult:
    """Tokenise `cfg.data` into its cache as a measured job in `run_dir` (after the scheduler's start
    decision), and record the job's figures in the ledger next to the cache. A cache that exists already
    is a no-op: nothing is waited for, measured or written."""
    from greenstack.tracked import TrackedRun

    plan = plan_cache(cfg.data)
    if plan.exists:
        prepared, _ = latest_prepare(read_ledger(ledger_path(plan.path)))
        return PrepareResult(plan, False, "the cache exists already", prepared_by=prepared)
    run_dir = Path(run_dir)
    job_cfg = OmegaConf.masked_copy(cfg, [k for k in ("carbon", "energy", "scheduler", "project", "run_name")
                                          if k in cfg])
    OmegaConf.set_struct(job_cfg, False)
    job_cfg["run_name"] = cfg.get("run_name") or "data_prepare"
    run = TrackedRun(job_cfg, run_dir, clock=clock, sleep=sleep, meters=meters)
    t0 = time.perf_counter()
    try:
        run.decide_start()  # may wait for a low-carbon window; holds nothing meanwhile
        _save_config(cfg, run_dir)
        run.start()
        log.info("data prepare: tokenising %s into %s", plan.describe, plan.path)
        built = _instantiate(cfg.data, cache_only="build")
        figures = {"data/cache_mb": Figure(round(built.path.stat().st_size / 1e6, 4), "MB", "measured",
                                           f"size of {built.path}")}
        if built.tokens is not None:
            figures["data/tokens"] = Figure(built.tokens, "tokens", "measured",
                                            f"tokens in the cache {built.path.name} (every split)")
        summary = run.finish(figures=figures)
    except BaseException as e:
        run.finish(error=e)
        raise
    duration = time.perf_counter() - t0
    if not built.written:  # written by another job while this one waited for its window: nothing to record
        return PrepareResult(plan, False, "another job prepared the cache while this one waited", run_dir, summary,
                             duration_s=duration)
    metrics = summary.get("metrics", {})
    append_record(ledger_path(plan.path), {
        "event": "prepare", "run_id": run.run_id, "run_dir": str(run_dir.resolve()), "cache": str(plan.path),
        "describe": plan.describe, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "figures": {k: metrics[k] for k in (*PREPARE_FIGURES, "data/tokens") if k in metrics}})
    return PrepareResult(plan, True, "tokenised", run_dir, summary, duration_s=duration)


def _save_config(cfg: DictConfig, run_dir: Path) -> None:
    """The job's config in `.hydra/config.yaml`, as a training run keeps it (secrets redacted)."""
    from greenstack.io import atomic_write_bytes
    from greenstack.secrets import redact

    container = redact(OmegaConf.to_container(cfg, resolve=True))
    atomic_write_bytes(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(container)).encode())
