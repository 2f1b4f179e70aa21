"""Starting the workers of a federated run and joining the process group.

`greenstack train federated=geo` with RANK unset spawns the workers itself through torch's elastic
launcher (one machine, c10d rendezvous on a free 127.0.0.1 port); under an external `torchrun` or
Slurm launch (RANK/WORLD_SIZE set) each process joins the group directly. Every worker then runs the
normal run path; collectives carry timeouts so a dead peer fails the run instead of hanging it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from greenstack.errors import ConfigError, GreenstackError
from greenstack.federated.config import GEO_TARGETS, Region, federated_world_size, parse_regions, rank_regions

log = logging.getLogger("greenstack")
DEFAULT_TIMEOUT_S = 300.0
#: "forkserver": workers fork from a fresh single-threaded server that imported greenstack once, so they
#: start in seconds without inheriting the launcher's threads (plain fork can deadlock on their locks)
START_METHOD = os.environ.get("GREENSTACK_START_METHOD", "forkserver")
PRELOAD = ["torch", "greenstack.runner", "greenstack.federated.launch"]


def preload_forkserver(modules: list[str] | None = None) -> None:
    """Import the heavy modules once in the forkserver instead of in every worker."""
    import multiprocessing.forkserver

    multiprocessing.forkserver.set_forkserver_preload(list(modules or PRELOAD))


class WorkerFailed(GreenstackError):
    """A worker process of a federated run failed; the message names its rank and cause."""

    exit_code = 1


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1 (for the rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def federated_node(cfg: Any) -> dict[str, Any] | None:
    """The `federated` node as a plain dict, or None for `federated=none`."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg.get("federated")
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return dict(node) if isinstance(node, Mapping) and "_target_" in node else None


def wants_spawn(cfg: Any) -> bool:
    """Whether this process should spawn the workers itself (several asked for, no launcher around)."""
    node = federated_node(cfg)
    return node is not None and federated_world_size(node) > 1 and "RANK" not in os.environ


def spawn(cfg: Any, run_dir: str | Path, entry: Callable[[dict[str, Any], str], dict[str, Any] | None]
          ) -> dict[str, Any]:
    """Run `entry(container, run_dir)` (the runner's `worker_main`, passed in so that this module does not
    import the runner above it) in every worker via `torch.distributed.launcher.api.elastic_launch`;
    returns rank 0's summary.

    A failing worker makes the agent stop the others; the error names its rank and cause.
    """
    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from greenstack.tracking.base import load_or_create_run_id

    node = federated_node(cfg) or {}
    nprocs = federated_world_size(node)
    load_or_create_run_id(run_dir)  # created once here, so every worker reads the same id
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container.pop("hydra", None)
    timeout_s = float(node.get("timeout_s", DEFAULT_TIMEOUT_S))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nprocs, run_id=f"greenstack-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}", max_restarts=0,
                          monitor_interval=0.2, start_method=START_METHOD, rdzv_configs={"timeout": int(timeout_s)})
    if START_METHOD == "forkserver":
        preload_forkserver()
    log.info("federated: spawning %d workers on this machine (elastic launcher, c10d rendezvous)", nprocs)
    markers = Path(run_dir) / FAILURE_DIR
    shutil.rmtree(markers, ignore_errors=True)
    try:
        with _quiet_agent():
            results = elastic_launch(config, entry)(container, str(run_dir))
    except ChildFailedError as e:
        preempted = _agreed_preemption(markers, nprocs)
        if preempted is not None:
            raise preempted from None
        rank, failure = root_failure(e.failures)
        cause, exit_code = _cause(failure), failure.exitcode
        first = first_marked_failure(markers)
        if first is not None and (first[0] != rank or _is_peer_error(cause)):
            rank, cause, exit_code = first[0], first[1], 1  # the worker that failed before leaving the group
        others = sorted(r for r in e.failures if r != rank)
        also = f" (then rank{'s' if len(others) > 1 else ''} {', '.join(map(str, others))} lost their peer)" \
            if others else ""
        # square brackets would be read as console markup when the CLI prints the message
        cause = cause.replace("[", "(").replace("]", ")")
        raise WorkerFailed(f"federated worker rank {rank} failed (exit code {exit_code}): {cause}{also}") \
            from None
    finally:
        shutil.rmtree(markers, ignore_errors=True)
    return results[0]


@contextlib.contextmanager
def _quiet_agent() -> Iterator[None]:
    """Silence the elastic agent's own error logs (tracebacks of its polling) unless GREENSTACK_DEBUG=1.

    Why: greenstack reports a failed or preempted worker itself, by rank and cause, without a traceback
    by default; the agent's log would print one for every worker exit.
    """
    if os.environ.get("GREENSTACK_DEBUG") == "1":
        yield
        return
    names = ("torch.distributed.elastic", "torch.distributed.elastic.multiprocessing.api",
             "torch.distributed.elastic.agent.server.api", "torch.distributed.launcher.api")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


#: where workers note their failure before leaving the process group (see `mark_failure`)
FAILURE_DIR = ".federated-failures"


def mark_failure(run_dir: str | Path, rank: int, error: BaseException) -> None:
    """Note this worker's failure *before* it closes the process group.

    Why: closing the group makes its peers fail at once with a lost-connection error, and the elastic
    agent may see a peer exit first (the failing worker is still unwinding), so its own report can
    name the wrong rank. The earliest note that is not a lost-peer error names the cause.
    """
    try:
        folder = Path(run_dir) / FAILURE_DIR
        folder.mkdir(parents=True, exist_ok=True)
        text = f"{type(error).__name__}: {error}".strip().splitlines()[0][:2000]
        (folder / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "cause": text, "at": time.time()}))
    except OSError:
        pass  # best effort: the agent's own report remains


def _agreed_preemption(folder: Path, world_size: int) -> GreenstackError | None:
    """Every worker stopped on the same agreed preemption (each saved its checkpoint): say so, resumably.

    Why: a preempted run is not a failed one; the CLI should exit 128+signal with the resume hint, as a
    single-process run does, instead of blaming one worker.
    """
    import re
    import signal

    from greenstack.policies.checkpointing.hierarchical import Preempted

    notes = {}
    for path in folder.glob("rank-*.json"):
        try:
            note = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        notes[int(note["rank"])] = str(note["cause"])
    if sorted(notes) != list(range(world_size)) or not all(c.startswith("Preempted:") for c in notes.values()):
        return None
    first = notes[0].removeprefix("Preempted:").strip()
    m = re.search(r"\b(SIG[A-Z0-9]+)\b", first)
    signum = int(getattr(signal, m.group(1), signal.SIGTERM)) if m else int(signal.SIGTERM)
    steps = {re.search(r"at step (\d+)", c).group(1) for c in notes.values() if re.search(r"at step (\d+)", c)}
    where = f"at step {steps.pop()}" if len(steps) == 1 else "at their last steps"
    return Preempted(signum, f"all {world_size} workers preempted {where} and saved their checkpoints "
                             f"(rank 0: {first}); rerun the same command with checkpointing.resume=auto to continue")


def first_marked_failure(folder: Path) -> tuple[int, str] | None:
    """(rank, cause) of the earliest noted failure that is not a lost-peer error, if any."""
    notes = []
    for path in folder.glob("rank-*.json"):
        try:
            notes.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    causes = sorted((n["at"], n["rank"], n["cause"]) for n in notes if not _is_peer_error(n["cause"]))
    return (int(causes[0][1]), str(causes[0][2])) if causes else None


def _is_peer_error(text: str) -> bool:
    return any(marker in text.lower() for marker in _PEER_ERRORS)


#: what a worker reports when a *peer* died: a consequence, not the cause
_PEER_ERRORS = ("gloo", "nccl", "connection closed", "connection reset", "distbackenderror", "broken pipe",
                "timed out", "timeout", "terminated", "sigterm")


def root_failure(failures: Mapping[int, Any]) -> tuple[int, Any]:
    """The failure that caused the others: the earliest one that is not a lost-peer error from the backend."""
    def is_consequence(failure: Any) -> bool:
        return _is_peer_error(_cause(failure)) or getattr(failure, "signal_name", lambda: "")() \
            in ("SIGTERM", "SIGKILL")

    ranked = sorted(failures.items(), key=lambda kv: (is_consequence(kv[1]), kv[1].timestamp, kv[0]))
    return ranked[0]


def _cause(failure: Any) -> str:
    message = getattr(failure, "message", "") or ""
    if isinstance(message, Mapping):
        message = message.get("message", "")
    text = str(message).strip()
    if not text or text.startswith("To enable traceback"):
        sig = getattr(failure, "signal_name", lambda: "")()
        return f"killed by {sig}" if sig and sig != "<N/A>" else "no error message (see the worker's output above)"
    return text.splitlines()[0][:2000]


@dataclass
class WorkerContext:
    """This process's place in a federated run: rank, world and (geo) region."""

    rank: int
    world_size: int
    local_rank: int
    region: Region | None
    backend: str
    owns_group: bool

    def carbon_override(self) -> dict[str, Any]:
        """The region's carbon settings, laid over the run's `carbon` config."""
        return dict(self.region.carbon) if self.region is not None else {}

    def close(self, *, finished: bool = False) -> None:
        """Leave the process group; after a finished run, only once every worker is done with it
        (tearing gloo down while a peer still uses it can abort that peer)."""
        if self.owns_group and dist.is_initialized():
            if finished:
                dist.barrier()
            dist.destroy_process_group()


def join(cfg: Any) -> WorkerContext | None:
    """Join (or, for a single process, create) the process group of a federated run; None for `none`.

    gloo on CPU, NCCL when the run trains on CUDA; `timeout_s` bounds every collective so a worker
    that died is reported instead of waited for forever.
    """
    node = federated_node(cfg)
    if node is None:
        return None
    expected = federated_world_size(node)
    timeout = timedelta(seconds=float(node.get("timeout_s", DEFAULT_TIMEOUT_S)))
    backend = str(node.get("backend", "auto"))
    if backend == "auto":
        device = str(cfg.get("trainer", {}).get("device", "auto"))
        cuda = torch.cuda.is_available() and device != "cpu"
        backend = "nccl" if cuda and dist.is_nccl_available() else "gloo"
    owns = not dist.is_initialized()
    if "RANK" in os.environ:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world != expected:
            raise ConfigError(f"the launch has {world} processes but the federated config asks for {expected}",
                              key="WORLD_SIZE", value=world, fix="match torchrun --nproc-per-node/srun --ntasks "
                                                                  "to the regions' total capacity")
        local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
        if owns:
            if "MASTER_ADDR" not in os.environ and "SLURM_JOB_ID" in os.environ:
                raise ConfigError("MASTER_ADDR is not set", key="MASTER_ADDR",
                                  fix="export MASTER_ADDR=$(scontrol show hostnames $SLURM_JOB_NODELIST | head -1)")
            if backend == "nccl":
                torch.cuda.set_device(local_rank % max(torch.cuda.device_count(), 1))
            dist.init_process_group(backend, timeout=timeout)
        threads = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(threads, 1)))
    else:
        if expected != 1:  # the runner spawns in this case; reaching here is a programming error
            raise ConfigError("several workers requested without a launcher", key="federated", value=expected)
        local_rank = 0
        if owns:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                                    timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    region = None
    if str(node["_target_"]).endswith(GEO_TARGETS):
        region = rank_regions(parse_regions(node.get("regions")))[rank]
    return WorkerContext(rank, world, local_rank, region, backend, owns)


def shard_loader(loader: Any, rank: int, world_size: int) -> Any:
    """The train loader restricted to every `world_size`-th sample from `rank` (same batch size, shuffling).

    Shards are disjoint, so workers see different data, like a DistributedSampler, while the loader keeps
    the generator the loop uses for exact resume.
    """
    from torch.utils.data import DataLoader, RandomSampler, Subset

    if world_size <= 1 or not isinstance(loader, DataLoader) or loader.batch_size is None:
        return loader  # custom batch samplers (length grouping) keep the full set on every worker
    from greenstack.efficiency.sampler import LengthGroupedSampler

    per_worker = len(loader.dataset) // world_size  # type: ignore[arg-type]
    # equal shards: every worker plans the same number of steps, so their collectives line up
    indices = list(range(rank, per_worker * world_size, world_size))
    dataset = Subset(loader.dataset, indices)  # type: ignore[arg-type]
    common = {"batch_size": loader.batch_size, "generator": loader.generator, "num_workers": loader.num_workers,
              "collate_fn": loader.collate_fn, "drop_last": loader.drop_last}
    sampler = loader.sampler
    if isinstance(sampler, LengthGroupedSampler):  # text: keep length grouping (dynamic padding) on the shard
        grouped = LengthGroupedSampler(dataset, [sampler.lengths[i] for i in indices], generator=loader.generator,
                                       group_by_length=sampler.group_by_length, bucket_size=sampler.bucket_size)
        return DataLoader(dataset, sampler=grouped, **common)
    return DataLoader(dataset, shuffle=isinstance(sampler, RandomSampler), **common)


def shared_run_id(run_dir: str | Path, worker: WorkerContext) -> str:
    """Rank 0's run id (created in the run dir if new), broadcast so every worker reports under one id."""
    from greenstack.tracking.base import load_or_create_run_id

    box = [load_or_create_run_id(run_dir) if worker.rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return str(box[0])


class NullSink:
    """Metrics sink of ranks other than 0: rank 0 writes the run's one metrics.jsonl."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        del metrics, step

    def close(self) -> None:
        """Nothing to release."""
