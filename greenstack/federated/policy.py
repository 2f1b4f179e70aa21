"""The `federated` group's policies: plain data parallel (`ddp`) and geo-distributed local-SGD (`geo`).

Both hook into the loop through ordinary events, and both expect the runner to have joined the process
group (`greenstack.federated.launch.join`). `GeoTraining` does DiLoCo-style rounds: each worker takes
local optimizer steps, and every `local_steps` steps the workers exchange compressed pseudo-gradients
(top-k with error feedback), average them weighted by the work each did, and apply an outer optimizer.
The coordinator (rank 0) decides per round, from each region's grid intensity, which regions sit out or
do fewer steps; a worker that does fewer steps skips ahead in the loop's step counter, so every worker
reaches the same collectives at the same round.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import ConfigError, GreenstackError, Problem, above, at_least, checked
from greenstack.federated import secure
from greenstack.federated.config import parse_regions, rank_regions
from greenstack.federated.core import (
    INDEX_BYTES,
    OuterOptimizer,
    ParticipationRule,
    flat_params,
    load_flat_params_,
    param_count,
    topk_with_error_feedback,
    weighted_dense_average,
    weighted_sparse_average,
)
from greenstack.provenance import Figure, weakest

log = logging.getLogger("greenstack")
J_PER_KWH = 3.6e6
BYTES_SOURCE = "payload bytes this run passed to torch.distributed collectives (counted, all workers)"


def _need_group(name: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{name} needs a torch.distributed process group: run it through `greenstack train` "
                           "(which joins or spawns one) or call greenstack.federated.launch.join first")


def _comm_device(state: State) -> torch.device:
    """Where small control tensors live: NCCL only moves CUDA tensors, gloo prefers CPU ones."""
    return state.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _process_meter(interval_s: float = 1.0) -> Any:
    """An energy monitor of this worker process alone, so each region's share is its own."""
    from greenstack.energy import EnergyMonitor, select_meters

    meters, _ = select_meters("tdp", pid=os.getpid())
    return EnergyMonitor([m for m in meters if m.name != "nvml"] or meters, interval_s=interval_s).start()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().cpu().numpy().tobytes()


def _from_bytes(blob: bytes, dtype: torch.dtype, shape: Any, device: torch.device) -> torch.Tensor:
    if not blob:
        return torch.zeros(shape, dtype=dtype, device=device)
    return torch.frombuffer(bytearray(blob), dtype=dtype).reshape(shape).to(device)


class DataParallel(Policy):
    """Plain data parallel: the model wrapped in DistributedDataParallel for the fit, with counted bytes.

    `comm_hook`: "allreduce" (DDP's default averaging) or "powersgd" (low-rank gradient compression,
    `powersgd_rank`; on gloo the whole model goes in one bucket, which PowerSGD needs there).
    `exact_resume`: keep DDP's gradient buckets in construction order. DDP re-orders them after the
    first step of every process, so the first step after a resume sums gradients in another order
    (last-bit differences, which Adam can amplify on near-zero gradients); fixed buckets make a
    resumed run bit-identical to an uninterrupted one, at one autograd-graph traversal per step
    (DDP's `find_unused_parameters`).
    """

    role = Role.MODIFIER

    events = frozenset({Event.INIT, Event.FIT_END, Event.EXCEPTION})

    @checked("federated")
    def __init__(self, workers: Annotated[int, at_least(1, integer=True, fix="processes on this machine")] = 2,
                 comm_hook: Literal["allreduce", "powersgd"] = "allreduce",
                 powersgd_rank: Annotated[int, at_least(1, integer=True)] = 2,
                 backend: Literal["auto", "gloo", "nccl"] = "auto",
                 timeout_s: Annotated[float, above(0, fix="seconds to wait for the other workers")] = 300.0,
                 exact_resume: bool = False, name: str | None = None) -> None:
        super().__init__(name=name or "ddp")
        self.workers, self.comm_hook, self.powersgd_rank = workers, comm_hook, powersgd_rank
        self.exact_resume = bool(exact_resume)
        self.bytes_sent = 0
        self.total_bytes_sent: int | None = None
        self.steps = 0

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        if event is Event.INIT:
            _need_group("federated=ddp")
            state.rank, state.world_size = dist.get_rank(), dist.get_world_size()
            model = state.model
            size_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
            one_bucket = self.comm_hook == "powersgd" and dist.get_backend() == "gloo"
            import inspect

            # buffers (BatchNorm statistics) stay local between steps, as with broadcast_buffers=False
            sync_kw = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
                else "broadcast_buffers"
            kwargs: dict[str, Any] = {sync_kw: False}
            if self.exact_resume:  # no bucket rebuild after the first step (see the class docstring)
                kwargs["find_unused_parameters"] = True
            if one_bucket:
                kwargs["bucket_cap_mb"] = size_mb + 1
            if state.device.type == "cuda":
                kwargs["device_ids"] = [state.device]
            ddp = DDP(model, **kwargs)
            ddp.register_comm_hook(self._hook_state(), self._hook())
            state.model = ddp
            self._comm = _comm_device(state)
            if state.world_size > 1:  # a preemption stops every worker at the same step (see _agree)
                state.preemption.coordinate(self._agree)
            return
        if event in (Event.FIT_END, Event.EXCEPTION):
            state.preemption.coordinate(None)
        if isinstance(state.model, DDP):  # FIT_END / EXCEPTION: hand the plain model back
            state.model = state.model.module
            if event is Event.FIT_END:
                total = torch.tensor([float(self.bytes_sent)], dtype=torch.float64, device=_comm_device(state))
                dist.all_reduce(total)
                self.total_bytes_sent = int(total.item())

    def _agree(self, local: int | None) -> tuple[int, int] | None:
        """Called by checkpointing at every step end on every worker: (signal, rank) of the first request.

        Why per step: DDP workers meet in every backward pass, so a worker that stopped alone would
        leave the others waiting on its gradients; one scalar all-reduce per step costs far less.
        """
        mine = torch.tensor([int(local or 0)], dtype=torch.int64, device=self._comm)
        flags = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(flags, mine)
        asked = [(int(f.item()), rank) for rank, f in enumerate(flags) if f.item()]
        return asked[0] if asked else None

    def _hook_state(self) -> Any:
        if self.comm_hook == "powersgd":
            from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

            return psgd.PowerSGDState(process_group=None, matrix_approximation_rank=self.powersgd_rank,
                                      start_powerSGD_iter=2, use_error_feedback=True, warm_start=True)
        return None

    def _hook(self) -> Any:
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        if self.comm_hook == "allreduce":
            def allreduce(state, bucket):  # unannotated: DDP checks hook annotations at runtime
                buf = bucket.buffer()
                self.bytes_sent += buf.numel() * buf.element_size()
                return default_hooks.allreduce_hook(dist.group.WORLD, bucket)
            return allreduce
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as psgd

        def powersgd(state, bucket):
            self.bytes_sent += _powersgd_bytes(state, bucket)
            return psgd.powerSGD_hook(state, bucket)
        return powersgd

    def summary(self) -> dict[str, Any]:
        if self.total_bytes_sent is None:
            return {}
        return {"federated/bytes_sent": Figure(self.total_bytes_sent, "B", "measured", BYTES_SOURCE),
                "federated/workers": Figure(self.workers, "processes", "measured", "torch.distributed world size")}


def _powersgd_bytes(state: Any, bucket: Any) -> int:
    """Bytes PowerSGD's hook sends for a bucket: full allreduce while warming up, P and Q factors after."""
    buf = bucket.buffer()
    if state.iter < state.start_powerSGD_iter:
        return buf.numel() * buf.element_size()
    total = 0
    rank = state.matrix_approximation_rank
    for grad in bucket.gradients():
        if grad.ndimension() <= 1:
            total += grad.numel() * 4
            continue
        n, m = grad.shape[0], grad.numel() // grad.shape[0]
        r = min(n, m, rank)
        compressed = (n + m) * r
        total += 4 * (compressed if compressed * state.min_compression_rate < n * m else n * m)
    return total


class GeoTraining(Policy):
    """Geo-distributed local SGD over regions, with compressed, work-weighted, carbon-aware averaging.

    regions: {name: {capacity: workers, role: coordinator|worker, carbon: {kind, zone, ...}}}
    local_steps: inner optimizer steps per outer round. outer_optimizer: {lr, momentum, nesterov}.
    compression: {kind: topk|none, ratio: (0, 1]}. participation: {mode: uniform|carbon_aware,
    threshold_g_per_kwh, margin, dirty_steps_fraction}. sync: {mode: sync|async, max_staleness}.
    clock: {replay_start, round_duration_s}: price round r at replay_start + r * round_duration_s
    (replaying traces in benchmarks); unset = the real time of each round.
    secure_aggregation: mask each worker's update so that only the work-weighted sum can be read
    (`greenstack.federated.secure`; top-k becomes a shared random-k support). transport:
    process_group (gloo/NCCL, in the clear) or tls (every geo message over mutual TLS 1.3 with the
    run's certificates, `tls: {dir, host, port}`; see `greenstack.federated.transport`).
    """

    role = Role.MODIFIER

    events = frozenset({Event.INIT, Event.FIT_START, Event.STEP_END, Event.FIT_END, Event.EXCEPTION})
    always = frozenset({Event.INIT, Event.FIT_START, Event.STEP_END, Event.FIT_END, Event.EXCEPTION})

    def __init__(self, regions: Mapping[str, Any], local_steps: int = 8,
                 outer_optimizer: Mapping[str, Any] | None = None, compression: Mapping[str, Any] | None = None,
                 participation: Mapping[str, Any] | None = None, sync: Mapping[str, Any] | None = None,
                 clock: Mapping[str, Any] | None = None, backend: str = "auto", timeout_s: float = 300.0,
                 secure_aggregation: bool = False, transport: str = "process_group",
                 tls: Mapping[str, Any] | None = None, name: str | None = None) -> None:
        super().__init__(name=name or "geo")
        problems: list[Problem] = []
        try:
            self.regions = parse_regions(regions)
        except ConfigError as e:
            problems.extend(e.problems)
            self.regions = []
        if isinstance(local_steps, bool) or not isinstance(local_steps, int) or local_steps < 1:
            problems.append(Problem("federated.local_steps", local_steps, "must be a whole number of steps >= 1"))
        outer = dict(outer_optimizer or {})
        comp = dict(compression or {"kind": "topk", "ratio": 0.1})
        part = dict(participation or {"mode": "uniform"})
        sync_cfg = dict(sync or {"mode": "sync"})
        clock_cfg = dict(clock or {})
        self._check_keys(problems, "outer_optimizer", outer, {"lr", "momentum", "nesterov"})
        self._check_keys(problems, "compression", comp, {"kind", "ratio"})
        self._check_keys(problems, "participation", part, {"mode", "threshold_g_per_kwh", "margin",
                                                           "dirty_steps_fraction"})
        self._check_keys(problems, "sync", sync_cfg, {"mode", "max_staleness"})
        self._check_keys(problems, "clock", clock_cfg, {"replay_start", "round_duration_s"})
        kind = comp.get("kind", "topk")
        ratio = comp.get("ratio", 0.1)
        if kind not in ("topk", "none"):
            problems.append(Problem("federated.compression.kind", kind, "unknown compression",
                                    "topk (with error feedback) or none; PowerSGD is federated=ddp "
                                    "federated.comm_hook=powersgd"))
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
            problems.append(Problem("federated.compression.ratio", ratio, "must be in (0, 1]",
                                    "the fraction of coordinates sent per round, e.g. 0.1"))
        lr, momentum = outer.get("lr", 1.0), outer.get("momentum", 0.0)
        if not isinstance(lr, (int, float)) or not lr > 0:
            problems.append(Problem("federated.outer_optimizer.lr", lr, "must be > 0"))
        if not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            problems.append(Problem("federated.outer_optimizer.momentum", momentum, "must be in [0, 1)"))
        mode = part.get("mode", "uniform")
        if mode not in ("uniform", "carbon_aware"):
            problems.append(Problem("federated.participation.mode", mode, "unknown mode", "uniform or carbon_aware"))
        threshold, margin = part.get("threshold_g_per_kwh"), part.get("margin", 0.5)
        if threshold is not None and (not isinstance(threshold, (int, float)) or threshold < 0):
            problems.append(Problem("federated.participation.threshold_g_per_kwh", threshold, "must be >= 0 or null"))
        if margin is not None and (not isinstance(margin, (int, float)) or margin < 0):
            problems.append(Problem("federated.participation.margin", margin, "must be >= 0 or null"))
        fraction = part.get("dirty_steps_fraction", 0.0)
        if not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
            problems.append(Problem("federated.participation.dirty_steps_fraction", fraction, "must be in [0, 1]"))
        sync_mode, staleness = sync_cfg.get("mode", "sync"), sync_cfg.get("max_staleness", 1)
        if sync_mode not in ("sync", "async"):
            problems.append(Problem("federated.sync.mode", sync_mode, "unknown mode", "sync or async"))
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 1:
            problems.append(Problem("federated.sync.max_staleness", staleness, "must be a whole number of rounds >= 1"))
        replay_start, round_s = clock_cfg.get("replay_start"), clock_cfg.get("round_duration_s")
        if round_s is not None and (not isinstance(round_s, (int, float)) or not round_s > 0):
            problems.append(Problem("federated.clock.round_duration_s", round_s, "must be > 0 seconds or null"))
        start_dt = None
        if replay_start is not None:
            try:
                start_dt = datetime.fromisoformat(str(replay_start).replace("Z", "+00:00"))
                if start_dt.tzinfo is None:
                    raise ValueError("no timezone")
            except ValueError as e:
                problems.append(Problem("federated.clock.replay_start", replay_start, f"not an ISO-8601 UTC time: {e}",
                                        "e.g. 2023-05-02T00:00:00Z"))
        if backend not in ("auto", "gloo", "nccl"):
            problems.append(Problem("federated.backend", backend, "unknown backend", "auto, gloo or nccl"))
        if not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            problems.append(Problem("federated.timeout_s", timeout_s, "must be > 0 seconds"))
        tls_cfg = dict(tls or {})
        self._check_keys(problems, "tls", tls_cfg, {"dir", "host", "port"})
        if not isinstance(secure_aggregation, bool):
            problems.append(Problem("federated.secure_aggregation", secure_aggregation, "must be true or false"))
        if transport not in ("process_group", "tls"):
            problems.append(Problem("federated.transport", transport, "unknown transport",
                                    "process_group (gloo/NCCL, in the clear) or tls (mutual TLS 1.3)"))
        elif transport == "tls":
            from greenstack.federated.transport import check_tls_dir

            problems += check_tls_dir(tls_cfg.get("dir"), [r.name for r in self.regions])
        port = tls_cfg.get("port", 0)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            problems.append(Problem("federated.tls.port", port, "must be a TCP port (0 = any free port)"))
        if problems:
            raise ConfigError(problems)
        self.timeout_s = float(timeout_s)
        self.secure = bool(secure_aggregation)
        self.transport, self.tls = str(transport), tls_cfg
        self._channel: Any = None  # the TLS channel (transport=tls), opened at INIT
        self._pair_keys: dict[int, bytes] = {}  # secure aggregation: ChaCha20 keys shared with each rank
        self._support_seed = 0
        self._clipped = 0
        self.local_steps = int(local_steps)
        self.outer = OuterOptimizer(lr=float(lr), momentum=float(momentum), nesterov=bool(outer.get("nesterov", False)))
        self.compression, self.ratio = str(kind), float(ratio)
        self.rule = ParticipationRule(mode=str(mode), threshold_g_per_kwh=threshold, margin=margin,
                                      dirty_steps_fraction=float(fraction))
        self.async_mode, self.max_staleness = sync_mode == "async", int(staleness)
        self.replay_start, self.round_duration_s = start_dt, round_s
        self.rank_regions = rank_regions(self.regions)
        self.world_size = len(self.rank_regions)
        #: per-round records (rank 0): decision, intensities, steps, bytes, energy and emissions per region
        self.decisions: list[dict[str, Any]] = []
        self.bytes_sent = 0  # this worker
        self._saved: dict[str, int] | None = None  # where a resumed worker's round stood (load_state_dict)
        self._sources: dict[str, Any] = {}
        self._monitor: Any = None
        self._final: dict[str, Any] | None = None

    @staticmethod
    def _check_keys(problems: list[Problem], key: str, node: dict[str, Any], allowed: set[str]) -> None:
        for k in sorted(set(node) - allowed):
            problems.append(Problem(f"federated.{key}.{k}", node[k], "unknown setting",
                                    f"valid: {', '.join(sorted(allowed))}"))

    # -- events -----------------------------------------------------------------------------------
    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if event is Event.INIT:
            self._init(state)
        elif event is Event.FIT_START:
            saved, self._saved = self._saved, None
            self._round, self._round_start = (saved["round"], saved["round_start"]) if saved else (0, 0)
            if saved:
                self._check_resume_agrees(state, saved)
            self._plan_round(state)
            if saved:
                self._done = int(saved["done"])  # steps this worker had taken in the round when it was saved
            self._skip_sat_out_rounds(state, reporter)
        elif event is Event.STEP_END:
            self._done += 1
            if self._done >= self._budget and self._round_start < state.max_steps and not self._agreed_stop:
                self._end_round(state, reporter)
                self._skip_sat_out_rounds(state, reporter)
        elif event is Event.FIT_END:
            state.preemption.coordinate(None)
            state.preemption.gate_snapshots(None)
            if state.stop and not self._agreed_stop and self._round_start < state.max_steps:
                # this worker stopped early (early stopping, a budget...): take part in the round the
                # others are in, flagged, so everyone stops after it instead of waiting on a timeout
                self._end_round(state, reporter)
            self._drain(state, reporter, wait_all=True)
            self._finish(state)
        else:  # EXCEPTION: no collectives, just stop the meter thread
            state.preemption.coordinate(None)
            state.preemption.gate_snapshots(None)
            if self._monitor is not None:
                self._monitor.stop()
            self._close_channel()

    def _init(self, state: State) -> None:
        _need_group("federated=geo")
        if dist.get_world_size() != self.world_size:
            raise ConfigError(f"the process group has {dist.get_world_size()} workers, the regions' capacity is "
                              f"{self.world_size}", key="federated.regions", value=self.world_size)
        self.rank = dist.get_rank()
        self.region = self.rank_regions[self.rank]
        state.rank, state.world_size, state.region = self.rank, self.world_size, self.region.name
        self.device = state.device
        self._comm = _comm_device(state)
        # same starting point everywhere, whatever each process's initialisation did
        if self.transport == "tls":
            self._channel = self._open_tls()
        flat = flat_params(state.model)
        self._broadcast(flat, src=0)
        self.bytes_sent += flat.numel() * flat.element_size() if self.rank == 0 else 0
        if self.secure:
            self._agree_keys()
        load_flat_params_(state.model, flat)
        self._n_params = param_count(state.model)
        self._base = flat.clone()  # what local progress is measured from (the last agreed parameters)
        self._error = torch.zeros_like(flat) if self.compression == "topk" else None
        self._pending: list[dict[str, Any]] = []
        self._agreed_stop = False  # a worker stopped early and every worker has seen it (see FIT_END)
        # a worker's preemption request travels with the next exchange; all workers stop after that round
        state.preemption.coordinate(lambda local: None)
        # periodic snapshots at round boundaries only, where every worker's state lines up
        state.preemption.gate_snapshots(lambda st: st.step == self._round_start or st.step >= st.max_steps)
        self._per_region = {r.name: {"energy_kwh": 0.0, "emissions_kg": 0.0, "steps": 0, "rounds_sat_out": 0,
                                     "workers": r.capacity} for r in self.regions}
        self._energy_at_last_round = 0.0
        self._bytes_seen = 0
        self._rounds: list[dict[str, Any]] = []
        self._fit_t0 = datetime.now(timezone.utc)
        self._energy_provenance = "fallback"
        try:
            self._monitor = _process_meter()
            self._energy_provenance = weakest(*(m.provenance for m in self._monitor.meters))
            self._energy_source = "; ".join(m.source for m in self._monitor.meters) + ", per worker process"
        except Exception as e:  # noqa: BLE001 - per-region energy is reported as unavailable, not fatal
            log.warning("federated: no per-worker energy meter (%s); per-region energy will be missing", e)
        if self.rank == 0:
            from greenstack.measure import CarbonConfig

            for r in self.regions:
                self._sources[r.name] = CarbonConfig(**{k: v for k, v in r.carbon.items() if k != "_target_"}).source()
            log.info("federated=geo: %d workers in %s; %d local steps per round, compression %s%s, %s participation",
                     self.world_size, ", ".join(f"{r.name}×{r.capacity}" for r in self.regions), self.local_steps,
                     self.compression, f" {self.ratio:g}" if self.compression == "topk" else "", self.rule.mode)

    # -- rounds -----------------------------------------------------------------------------------
    def _round_time(self) -> datetime:
        if self.round_duration_s is not None:
            from datetime import timedelta

            start = self.replay_start or self._fit_t0
            return start + timedelta(seconds=self._round * float(self.round_duration_s))
        return self.replay_start or datetime.now(timezone.utc)

    def _plan_round(self, state: State) -> None:
        """Coordinator prices each region now and broadcasts every rank's local-step budget for this round."""
        length = min(self.local_steps, state.max_steps - self._round_start)
        world = self.world_size
        plan = torch.zeros(2 * world, dtype=torch.float64, device=self._comm)
        if self.rank == 0:
            at = self._round_time()
            intensity = {name: float(src.at(at).value) for name, src in self._sources.items()}
            budget = self.rule.steps(intensity, length)
            for i, r in enumerate(self.rank_regions):
                plan[i], plan[world + i] = budget[r.name], intensity[r.name]
            self._current = {"round": self._round, "at": at.isoformat(), "start_step": self._round_start,
                             "length": length, "intensity_g_per_kwh": intensity, "local_steps": budget,
                             "rule": self.rule.mode}
            self.bytes_sent += plan.numel() * plan.element_size()
        self._broadcast(plan, src=0)
        self._budget = int(plan[self.rank].item())
        self._intensity = float(plan[world + self.rank].item())
        self._length, self._done = length, 0

    def _skip_sat_out_rounds(self, state: State, reporter: Reporter) -> None:
        """While this worker sits a round out, take part in its exchange with no work and skip its steps."""
        while self._budget == 0 and self._round_start < state.max_steps and not self._agreed_stop:
            self._end_round(state, reporter)

    def _end_round(self, state: State, reporter: Reporter) -> None:
        flat = flat_params(state.model)
        update = self._base - flat  # pseudo-gradient: how far local steps moved from the agreed point
        steps = self._done
        energy_kwh = self._energy_delta_kwh()
        payload = self._secure_values(update, steps) if self.secure else self._compress(update, steps)
        if self.async_mode:
            self._base = flat  # later progress is measured from what was just sent
        header_bytes = 7 * 8
        if self.secure:  # one int64 code per coordinate of the shared support, no indices
            self.bytes_sent += header_bytes + payload[1].numel() * secure.CODE_BYTES * (steps > 0)
        else:
            self.bytes_sent += header_bytes + payload[0].numel() * INDEX_BYTES + payload[1].numel() * 4 * (steps > 0)
        header_t = torch.tensor([steps, payload[0].numel(), energy_kwh, energy_kwh * self._intensity / 1000.0,
                                 self.bytes_sent, float(state.stop), float(state.preemption.pending() or 0)],
                                dtype=torch.float64, device=self._comm)
        gathered = self._all_gather(header_t)
        stopped = [rank for rank, h in enumerate(gathered) if h[5].item() > 0]
        preempted = [(rank, int(h[6].item())) for rank, h in enumerate(gathered) if h[6].item() > 0]
        if self.secure:
            works, received = self._secure_exchange(gathered, payload)
        elif self._channel is not None:
            works, received = [], self._tls_exchange(gathered, payload)
        else:
            works, received = self._exchange(gathered, payload)
        self._pending.append({"round": self._round, "headers": gathered, "received": received, "works": works,
                              "update": update, "plan": getattr(self, "_current", None), "numel": flat.numel(),
                              "support": payload[0] if self.secure else None})
        skipped = self._round_start + self._length - state.step
        state.skip_steps(skipped)  # sat out or did fewer steps: every worker meets the next exchange
        self._drain(state, reporter, wait_all=not self.async_mode or bool(preempted))
        self._round += 1
        self._round_start += self._length
        if preempted:  # every worker saw the same flags: all save at this round boundary, then stop
            rank, signum = preempted[0]
            self._done = 0  # the next round has not begun: a resumed worker plans it afresh
            state.preemption.preempt_now(state, signum, f"{signal.Signals(signum).name} to worker rank {rank} "
                                   f"({self.rank_regions[rank].name}); every worker saves after round {self._round - 1}")
        if stopped:  # every worker saw the same flags: all stop after this round, none plans another
            self._agreed_stop = True
            if not state.stop:
                state.request_stop(f"federated: worker rank {stopped[0]} ({self.rank_regions[stopped[0]].name}) "
                                   f"stopped early; every worker stops after round {self._round - 1}")
            return
        if self._round_start < state.max_steps:
            self._plan_round(state)
        state.preemption.at_boundary(state)  # due snapshots here, on every worker (also one sitting this round out)

    # -- transport ---------------------------------------------------------------------------------
    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (same shape and dtype everywhere), over TLS or the process group."""
        if self._channel is None:
            out = [torch.zeros_like(t) for _ in range(self.world_size)]
            dist.all_gather(out, t)
            return out
        blobs = self._channel.all_gather_bytes(_tensor_bytes(t))
        return [_from_bytes(b, t.dtype, t.shape, t.device) for b in blobs]

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        """`t` from rank `src` into `t` on every rank."""
        if self._channel is None:
            dist.broadcast(t, src=src)
            return
        blob = self._channel.all_gather_bytes(_tensor_bytes(t) if self.rank == src else b"")[src]
        t.copy_(_from_bytes(blob, t.dtype, t.shape, t.device))

    def _open_tls(self) -> Any:
        """The TLS channel: rank 0 listens and announces its port over the process group, the others join."""
        from greenstack.federated.transport import TlsChannel, TlsFiles

        files = TlsFiles.for_region(self.tls["dir"], self.region.name)
        host = str(self.tls.get("host") or os.environ.get("MASTER_ADDR") or "127.0.0.1")
        port_t = torch.zeros(1, dtype=torch.int64, device=self._comm)
        if self.rank == 0:
            channel = TlsChannel.serve(files, [r.name for r in self.rank_regions], host=host,
                                       port=int(self.tls.get("port") or 0), timeout_s=self.timeout_s)
            port_t[0] = channel.port
        dist.broadcast(port_t, src=0)  # the only value the process group carries: a port number
        if self.rank == 0:
            return channel.accept()
        return TlsChannel.connect(files, self.rank, self.world_size, self.rank_regions[0].name, host,
                                  int(port_t.item()), timeout_s=self.timeout_s)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def _tls_exchange(self, headers: list[torch.Tensor], payload: tuple[torch.Tensor, torch.Tensor]
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The round's (indices, values) of every worker that did work, in one TLS all-gather."""
        idx, val = payload
        mine = _tensor_bytes(idx) + _tensor_bytes(val) if headers[self.rank][0].item() > 0 else b""
        blobs = self._channel.all_gather_bytes(mine)
        numel, device = self._base.numel(), self._base.device
        received = []
        for header, blob in zip(headers, blobs, strict=True):
            k = int(header[1].item()) if header[0].item() > 0 else 0
            if header[0].item() <= 0:
                received.append((torch.zeros(0, dtype=torch.int32, device=device), torch.zeros(0, device=device)))
                continue
            n_val = k if self.compression == "topk" else numel
            cut = 4 * k
            received.append((_from_bytes(blob[:cut], torch.int32, (k,), device),
                             _from_bytes(blob[cut:], self._base.dtype, (n_val,), device)))
        return received

    # -- secure aggregation --------------------------------------------------------------------------
    def _agree_keys(self) -> None:
        """Exchange X25519 public keys and derive a ChaCha20 key with every other worker."""
        pair = secure.KeyPair.generate()
        mine = pair.public_bytes()
        if self._channel is not None:
            publics = self._channel.all_gather_bytes(mine)
        else:
            t = torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(self._comm)
            publics = [bytes(g.cpu().tolist()) for g in self._all_gather(t)]
        self.bytes_sent += len(mine)
        self._pair_keys = pair.pair_keys(publics, self.rank)
        # the random-k supports: rank 0's torch seed (the run's seed), so reruns draw the same supports;
        # kept across a resume by state_dict
        seed = torch.tensor([torch.initial_seed() % (2**62)], dtype=torch.int64, device=self._comm)
        self._broadcast(seed, src=0)
        self._support_seed = int(seed.item())

    def _secure_values(self, update: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(shared support, this worker's values on it); the values are weighted and masked after the header."""
        numel = update.numel()
        ratio = self.ratio if self.compression == "topk" else 1.0
        support = secure.shared_support(numel, ratio, self._support_seed, self._round).to(update.device)
        if steps == 0:
            return support, torch.zeros(0, dtype=update.dtype, device=update.device)
        if self._error is None:
            return support, update[support].clone()
        self._error.add_(update)  # error feedback, as for top-k: what is not sent now is owed
        values = self._error[support].clone()
        self._error[support] = 0.0
        return support, values

    def _secure_exchange(self, headers: list[torch.Tensor], payload: tuple[torch.Tensor, torch.Tensor]
                         ) -> tuple[list[Any], list[torch.Tensor]]:
        """Each participant sends its work-weighted values as masked fixed-point codes; the masks cancel."""
        steps = [float(h[0].item()) for h in headers]
        participants = [r for r, s in enumerate(steps) if s > 0]
        total = sum(steps)
        support, values = payload
        k = support.numel()
        codes = torch.zeros(0, dtype=torch.int64)
        if self.rank in participants:
            encoded, clipped = secure.encode(values * (steps[self.rank] / total))
            self._clipped += clipped
            codes = secure.mask(encoded, self.rank, participants, self._pair_keys, self._round)
        if self._channel is not None:
            blobs = self._channel.all_gather_bytes(_tensor_bytes(codes) if self.rank in participants else b"")
            return [], [_from_bytes(b, torch.int64, (k,), torch.device("cpu")) if r in participants
                         else torch.zeros(0, dtype=torch.int64) for r, b in enumerate(blobs)]
        works, received = [], []
        comm = self._comm if self._comm.type == "cuda" else torch.device("cpu")
        for src in range(self.world_size):
            if src not in participants:
                received.append(torch.zeros(0, dtype=torch.int64))
                continue
            buf = codes.to(comm) if src == self.rank else torch.zeros(k, dtype=torch.int64, device=comm)
            works.append(dist.broadcast(buf, src=src, async_op=True))
            received.append(buf)
        return works, received

    def _compress(self, update: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, values) this worker sends; nothing when it sat out (error memory keeps what it owes)."""
        empty_idx = torch.zeros(0, dtype=torch.int32, device=update.device)
        if steps == 0:
            return empty_idx, torch.zeros(0, dtype=update.dtype, device=update.device)
        if self.compression == "topk":
            assert self._error is not None
            return topk_with_error_feedback(update, self._error, self.ratio)
        return empty_idx, update

    def _exchange(self, headers: list[torch.Tensor], payload: tuple[torch.Tensor, torch.Tensor]
                  ) -> tuple[list[Any], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each worker that did work broadcasts its (indices, values); async mode does not wait for them."""
        received, works = [], []
        numel = self._base.numel()
        for src, header in enumerate(headers):
            if header[0].item() <= 0:
                received.append((torch.zeros(0, dtype=torch.int32, device=self._base.device),
                                 torch.zeros(0, device=self._base.device)))
                continue
            k = int(header[1].item())
            if src == self.rank:
                idx, val = payload
            elif self.compression == "topk":
                idx = torch.zeros(k, dtype=torch.int32, device=self._base.device)
                val = torch.zeros(k, dtype=self._base.dtype, device=self._base.device)
            else:
                idx = torch.zeros(0, dtype=torch.int32, device=self._base.device)
                val = torch.zeros(numel, dtype=self._base.dtype, device=self._base.device)
            if self.compression == "topk":
                works.append(dist.broadcast(idx, src=src, async_op=True))
            works.append(dist.broadcast(val, src=src, async_op=True))
            received.append((idx, val))
        return works, received

    def _drain(self, state: State, reporter: Reporter, *, wait_all: bool) -> None:
        """Apply finished exchanges in order; wait when more than `max_staleness` rounds are in flight."""
        while self._pending:
            oldest = self._pending[0]
            limit = 0 if wait_all else self.max_staleness
            if len(self._pending) <= limit and not all(w.is_completed() for w in oldest["works"]):
                return
            for w in oldest["works"]:
                w.wait()
            self._pending.pop(0)
            self._apply(state, reporter, oldest)

    def _apply(self, state: State, reporter: Reporter, rnd: dict[str, Any]) -> None:
        headers = rnd["headers"]
        weights = [float(h[0].item()) for h in headers]
        if rnd.get("support") is not None:  # secure aggregation: the masked codes sum to the weighted average
            codes = [c for c, w in zip(rnd["received"], weights, strict=True) if w > 0]
            avg = torch.zeros(rnd["numel"], dtype=self._base.dtype, device=self._base.device)
            if codes:
                avg[rnd["support"].to(avg.device)] = secure.decode(secure.add_codes(codes)).to(avg.device, avg.dtype)
        elif self.compression == "topk":
            avg = weighted_sparse_average(rnd["numel"], [r[0] for r in rnd["received"]],
                                          [r[1] for r in rnd["received"]], weights)
        else:
            dense = [r[1] if w > 0 else torch.zeros(rnd["numel"], device=self._base.device)
                     for r, w in zip(rnd["received"], weights, strict=True)]
            avg = weighted_dense_average(dense, weights)
        if not self.async_mode:
            # every worker computes the same new parameters from the same gathered data: replicas stay equal
            anchor = self._base.clone()  # the agreed point before this round
            self.outer.step(anchor, avg, plain_from=self._n_params)
            load_flat_params_(state.model, anchor)
            self._base = anchor
        else:
            # undo this worker's own round update, apply the agreed one, keep progress made since sending
            moved = torch.zeros_like(avg)
            self.outer.step(moved, avg, plain_from=self._n_params)  # displacement the outer optimizer applies (anchor starting at 0)
            correction = rnd["update"] + moved
            load_flat_params_(state.model, flat_params(state.model) + correction)
            self._base = self._base + correction
        self._record(state, reporter, rnd, headers, weights)

    def _record(self, state: State, reporter: Reporter, rnd: dict[str, Any], headers: list[torch.Tensor], weights: list[float]) -> None:
        round_bytes = 0
        energy: dict[str, float] = {}
        emissions: dict[str, float] = {}
        for r, h in zip(self.rank_regions, headers, strict=True):
            agg = self._per_region[r.name]
            agg["energy_kwh"] += float(h[2].item())
            agg["emissions_kg"] += float(h[3].item())
            agg["steps"] += int(h[0].item())
            energy[r.name] = energy.get(r.name, 0.0) + float(h[2].item())
            emissions[r.name] = emissions.get(r.name, 0.0) + float(h[3].item())
        total_bytes = sum(int(h[4].item()) for h in headers)
        round_bytes, self._bytes_seen = total_bytes - self._bytes_seen, total_bytes
        if self.rank != 0 or rnd["plan"] is None:
            return
        sat_out = sorted({r.name for r, w in zip(self.rank_regions, weights, strict=True) if w == 0})
        for name in sat_out:
            self._per_region[name]["rounds_sat_out"] += 1
        self._rounds.append({"round": rnd["round"], "bytes_sent": round_bytes, "local_steps": rnd["plan"]["local_steps"],
                             "intensity_g_per_kwh": rnd["plan"]["intensity_g_per_kwh"],
                             "emissions_kg": sum(emissions.values())})
        decision = {**rnd["plan"], "sat_out": sat_out, "work_weights": weights, "bytes_sent": round_bytes, "energy_kwh": energy, "emissions_kg": emissions}
        self.decisions.append(decision)
        reporter.decision(self.audit_kind, decision)
        log.info("federated round %d: intensity %s g/kWh -> local steps %s%s", rnd["round"],
                 {k: round(v) for k, v in rnd["plan"]["intensity_g_per_kwh"].items()}, rnd["plan"]["local_steps"],
                 f"; sat out: {', '.join(sat_out)}" if sat_out else "")
        reporter.metrics({"federated/round": rnd["round"], "federated/bytes_sent": round_bytes,
                          "federated/participating_workers": sum(1 for w in weights if w > 0),
                          "federated/round_emissions_kg": sum(emissions.values())})

    def _energy_delta_kwh(self) -> float:
        if self._monitor is None:
            return 0.0
        self._monitor.sample(read=True)
        total = self._monitor.total_kwh()
        delta, self._energy_at_last_round = total - self._energy_at_last_round, total
        return max(delta, 0.0)

    def _finish(self, state: State) -> None:
        """Gather what each worker did after the last exchange and the byte totals (rank 0 reports)."""
        tail = self._energy_delta_kwh()
        if self._monitor is not None:
            self._monitor.stop()
        intensity = getattr(self, "_intensity", 0.0)
        t = torch.tensor([tail, tail * intensity / 1000.0, float(self.bytes_sent)], dtype=torch.float64,
                         device=self._comm)
        gathered = self._all_gather(t)
        total_bytes = 0
        for r, g in zip(self.rank_regions, gathered, strict=True):
            self._per_region[r.name]["energy_kwh"] += float(g[0].item())
            self._per_region[r.name]["emissions_kg"] += float(g[1].item())
            total_bytes += int(g[2].item())
        self._final = {"bytes_sent": total_bytes, "rounds": self._round, "regions": self._per_region,
                       "per_round": self._rounds}
        self._close_channel()

    # -- reporting --------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        if self._final is None:
            return {}
        f = self._final
        out: dict[str, Any] = {
            "federated/bytes_sent": Figure(f["bytes_sent"], "B", "measured", BYTES_SOURCE),
            "federated/rounds": Figure(f["rounds"], "rounds", "measured", "outer averaging rounds"),
            "federated/workers": Figure(self.world_size, "processes", "measured", "sum of region capacities"),
        }
        if self.secure:
            out["federated/secure_aggregation"] = Figure(
                1, "flag", "measured", "pairwise X25519/ChaCha20 masks in 2**48 fixed point; shared random-k support")
            out["federated/secure_clipped_values"] = Figure(
                self._clipped, "values", "measured", "update values beyond the fixed-point range, clipped (this worker)")
        if self.transport == "tls":
            out["federated/transport"] = Figure("tls1.3", "protocol", "measured",
                                                "every geo message over mutual TLS with the run's certificates")
        meter = getattr(self, "_energy_source", "no per-worker meter")
        e_prov = self._energy_provenance
        for name, agg in f["regions"].items():
            src = self._describe_source(name)
            out[f"federated/region/{name}/energy_kwh"] = Figure(agg["energy_kwh"], "kWh", e_prov, meter)
            out[f"federated/region/{name}/emissions_kg"] = Figure(
                agg["emissions_kg"], "kgCO2eq", weakest(e_prov, "estimated"),
                f"region energy x {src} at each round's time")
            out[f"federated/region/{name}/steps"] = Figure(agg["steps"], "steps", "measured",
                                                           "local optimizer steps, all workers of the region")
            out[f"federated/region/{name}/rounds_sat_out"] = Figure(agg["rounds_sat_out"], "rounds", "measured",
                                                                    "carbon-aware participation decisions")
        out["federated/emissions_kg"] = Figure(sum(a["emissions_kg"] for a in f["regions"].values()), "kgCO2eq",
                                               weakest(e_prov, "estimated"), "sum of per-region emissions")
        out["federated/energy_kwh"] = Figure(sum(a["energy_kwh"] for a in f["regions"].values()), "kWh",
                                             e_prov, meter)
        return out

    def _describe_source(self, name: str) -> str:
        src = self._sources.get(name)
        return getattr(src, "name", None) or str(next((r.carbon for r in self.regions if r.name == name), {}))

    def region_report(self) -> dict[str, Any] | None:
        """Per-region totals, bytes and rounds (rank 0 after the fit), for sustainability.json."""
        return self._final

    def recorded_decisions(self) -> list[dict[str, Any]]:
        return self.decisions

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed worker needs to rejoin the round it was in: the agreed point, its error
        memory, where the round stands, and the report's running totals (exchanges in flight in async
        mode are not saved: a resumed async worker re-syncs at its next round)."""
        out: dict[str, Any] = {"round": getattr(self, "_round", 0), "round_start": getattr(self, "_round_start", 0),
                               "done": getattr(self, "_done", 0), "outer": self.outer.state_dict(),
                               "decisions": self.decisions, "bytes_sent": self.bytes_sent,
                               "support_seed": self._support_seed}
        if getattr(self, "_base", None) is not None:
            out["base"] = self._base.detach().cpu().clone()
        if getattr(self, "_error", None) is not None:
            out["error"] = self._error.detach().cpu().clone()
        if hasattr(self, "_per_region"):
            out["per_region"] = {k: dict(v) for k, v in self._per_region.items()}
            out["rounds"] = list(self._rounds)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.outer.load_state_dict(state.get("outer", {}))
        self.decisions = list(state.get("decisions", []))
        self.bytes_sent = int(state.get("bytes_sent", self.bytes_sent))
        self._support_seed = int(state.get("support_seed", self._support_seed))  # same supports after a resume
        if "base" in state and getattr(self, "_base", None) is not None:  # INIT ran first: same shapes, device
            self._base = state["base"].to(self._base.device, self._base.dtype)
        if "error" in state and getattr(self, "_error", None) is not None:
            self._error = state["error"].to(self._error.device, self._error.dtype)
        if "per_region" in state and hasattr(self, "_per_region"):
            self._per_region = {k: dict(v) for k, v in state["per_region"].items()}
            self._rounds = list(state.get("rounds", []))
        self._saved = {"round": int(state.get("round", 0)), "round_start": int(state.get("round_start", 0)),
                       "done": int(state.get("done", 0))}

    def _check_resume_agrees(self, state: State, saved: dict[str, int]) -> None:
        """Every worker must resume in the same round, or their collectives would not line up."""
        mine = torch.tensor([saved["round"], saved["round_start"]], dtype=torch.float64, device=self._comm)
        gathered = self._all_gather(mine)
        rounds = [int(g[0].item()) for g in gathered]
        if len(set(rounds)) > 1:
            raise GreenstackError(
                f"federated=geo: the workers resumed from checkpoints of different rounds ({rounds}, by rank); "
                f"checkpoint at round boundaries (checkpointing.*_every a multiple of local_steps="
                f"{self.local_steps}) or remove the newer ranks' latest checkpoints so all resume in round "
                f"{min(rounds)}")

