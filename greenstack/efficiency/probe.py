"""Probe, then decide: time a few training steps of two configurations on one real batch.

Every efficiency policy in `auto` mode keeps itself only when a probe on *this* model, batch and
machine shows that it helps, and greenstack reports the probe's ratio instead of an assumed saving.
Probes run on private deep copies (or restore what they touch), inside `torch.random.fork_rng` so the
run's random stream is unchanged, and with active dispatch modes suspended: the measurement's FLOP
counter is open during the first batch and must neither count nor slow down probe steps.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from greenstack.provenance import weakest
from greenstack.tasks.base import forward

Batch = dict[str, Any]


class EnergyReader(Protocol):
    """Cumulative joules of the node (or process) so far, with the label of where they come from."""

    provenance: str
    source: str

    def __call__(self) -> float: ...


@dataclass
class MonitorEnergy:
    """Reads the run's EnergyMonitor synchronously (a real meter read, not the 1 s sampling thread).

    Only the components of hardware-counter meters (NVML, RAPL) are summed when there are any: a
    modelled RAM share next to a measured GPU would otherwise downgrade the whole reading.
    """

    monitor: Any

    def _meters(self) -> list[Any]:
        measured = [m for m in self.monitor.meters if m.provenance == "measured"]
        return measured or list(self.monitor.meters)

    def __call__(self) -> float:
        self.monitor.sample(read=True)
        components = {c for m in self._meters() for c in m.components}
        return float(sum(v for c, v in self.monitor.total_energy_j().items() if c in components))

    @property
    def provenance(self) -> str:
        return weakest(*(m.provenance for m in self._meters()))

    @property
    def source(self) -> str:
        return "; ".join(m.source for m in self._meters())


def energy_reader_from(state: Any) -> MonitorEnergy | None:
    """The running energy monitor of the run's measurement policy, if there is one (else None)."""
    for policy in state.policies:
        monitor = policy.energy_monitor()
        if monitor is not None and hasattr(monitor, "total_energy_j") and not getattr(monitor, "stopped", True):
            return MonitorEnergy(monitor)
    return None


@dataclass
class Variant:
    """One configuration to probe.

    `prepare` changes a private deep copy of the model (or returns a new module to use instead);
    `transform_batch` changes the batch (e.g. channels_last inputs).
    """

    name: str
    prepare: Callable[[torch.nn.Module], torch.nn.Module | None] | None = None
    transform_batch: Callable[[Batch], Batch] | None = None
    autocast_dtype: torch.dtype | None = None


@dataclass
class Timing:
    """What a probe measured for one variant (per training step of `samples_per_step` samples).

    `step_s` is the fastest step seen: on a shared machine noise only ever adds time, so the minimum
    is the most stable estimate; `median_s` guards decisions against one lucky step.
    """

    name: str
    step_s: float
    samples_per_step: int
    energy_j_per_step: float | None = None
    saved_activation_bytes: int | None = None
    peak_memory_bytes: int | None = None
    median_s: float | None = None
    steps_s: list[float] = field(default_factory=list)

    @property
    def samples_per_s(self) -> float:
        return self.samples_per_step / self.step_s if self.step_s > 0 else float("inf")

    @property
    def samples_per_j(self) -> float | None:
        if self.energy_j_per_step is None or self.energy_j_per_step <= 0:
            return None
        return self.samples_per_step / self.energy_j_per_step

    def pooled(self, other: Timing) -> Timing:
        """This timing and a repeat of it as one (more samples for a marginal decision)."""
        steps = self.steps_s + other.steps_s
        energy = None
        if self.energy_j_per_step is not None and other.energy_j_per_step is not None:
            energy = (self.energy_j_per_step + other.energy_j_per_step) / 2
        return Timing(self.name, min(steps), self.samples_per_step, energy, self.saved_activation_bytes,
                      self.peak_memory_bytes, statistics.median(steps), steps)


@dataclass
class Comparison:
    """Baseline vs candidate; `gain` > 1 means the candidate is better on `basis`.

    The decision basis is samples per joule only when the energy is read from a hardware counter
    (`measured`): a TDP model's joules are modelled power x time, so they cannot rank two
    configurations better than time does, and they add sampling noise.
    """

    baseline: Timing
    candidate: Timing
    energy_provenance: str | None = None
    energy_source: str | None = None

    @property
    def speedup(self) -> float:
        return self.baseline.step_s / self.candidate.step_s if self.candidate.step_s > 0 else float("inf")

    @property
    def median_speedup(self) -> float:
        a, b = self.baseline.median_s, self.candidate.median_s
        return a / b if a and b else self.speedup

    @property
    def energy_ratio(self) -> float | None:
        a, b = self.baseline.samples_per_j, self.candidate.samples_per_j
        return b / a if a and b else None

    @property
    def basis(self) -> str:
        return "samples/J" if self.energy_ratio is not None and self.energy_provenance == "measured" else "samples/s"

    @property
    def gain(self) -> float:
        return self.energy_ratio if self.basis == "samples/J" else self.speedup  # type: ignore[return-value]

    def helps(self, min_gain: float) -> bool:
        """Better by `min_gain` on the basis, and (on a time basis) in the median step as well."""
        if self.basis == "samples/J":
            return self.gain >= min_gain
        return self.speedup >= min_gain and self.median_speedup >= min_gain

    def hurts(self, min_gain: float) -> bool:
        """Worse by `min_gain` (the mirror of `helps`)."""
        if self.basis == "samples/J":
            return self.gain <= 1 / min_gain
        return self.speedup <= 1 / min_gain and self.median_speedup <= 1 / min_gain

    def pooled(self, other: Comparison) -> Comparison:
        return Comparison(self.baseline.pooled(other.baseline), self.candidate.pooled(other.candidate),
                          self.energy_provenance, self.energy_source)

    def describe(self, candidate: str, baseline: str) -> str:
        """'bf16 3.1× slower than fp32' (or faster / 'more samples per joule' on an energy basis)."""
        gain = self.gain
        if self.basis == "samples/J":
            word = "more" if gain >= 1 else "fewer"
            ratio = gain if gain >= 1 else 1 / gain
            return f"{candidate} {ratio:.2f}× {word} samples/J than {baseline} (speed {self.speedup:.2f}×)"
        if gain >= 1:
            return f"{candidate} {gain:.2f}× faster than {baseline}"
        return f"{candidate} {1 / gain:.2f}× slower than {baseline}"


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def isolated(device: torch.device) -> Iterator[None]:
    """Run probe code without touching the run's RNG streams or active dispatch modes (FLOP counter)."""
    try:  # private but stable since torch 2.0; without it probes would be counted as training FLOPs
        from torch.utils._python_dispatch import _disable_current_modes
    except ImportError:  # pragma: no cover - older/newer torch without it
        _disable_current_modes = contextlib.nullcontext  # type: ignore[assignment]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), _disable_current_modes():
        yield


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """torch.autocast for `dtype`, or nothing when `dtype` is None (fp32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def probe_loss(outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The loss a probe step uses, chosen by the batch's label shape as the built-in tasks make them:
    class labels (cross-entropy, as the loop), next-token labels (per-token cross-entropy), real values (MSE)."""
    labels = batch["labels"]
    if labels.is_floating_point():
        from greenstack.tasks.regression import Regression

        return Regression().loss(outputs, batch)
    if labels.ndim >= 2 and outputs.ndim == labels.ndim + 1:
        from greenstack.tasks.causal_lm import CausalLM

        return CausalLM().loss(outputs, batch)
    return F.cross_entropy(outputs.float(), labels)


def train_step(model: torch.nn.Module, batch: Batch, *, device: torch.device, autocast_dtype: torch.dtype | None,
               optimizer: torch.optim.Optimizer | None = None) -> None:
    """One forward + loss + backward (+ optimizer step) exactly as the loop does it; gradients cleared."""
    with autocast(device, autocast_dtype):
        logits = forward(model, batch)
        loss = probe_loss(logits, batch)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    else:
        model.zero_grad(set_to_none=True)


def saved_activation_bytes(model: torch.nn.Module, batch: Batch, *, device: torch.device,
                           autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes autograd keeps for backward in one forward (each storage once), on any device.

    Tensors saved inside non-reentrant checkpointed regions go to checkpoint's own hook and are not
    counted: that is the memory checkpointing frees (its block inputs stay alive and are not counted).
    """
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        with contextlib.suppress(RuntimeError, NotImplementedError):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, autocast_dtype):
        logits = forward(model, batch)
        loss = probe_loss(logits, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return int(sum(storages.values()))


def batch_size_of(batch: Batch) -> int:
    return int(batch["labels"].shape[0])


def probe_variants(model: torch.nn.Module, batch: Batch, variants: Sequence[Variant], *, device: torch.device,
                   steps: int = 2, rounds: int = 3, warmup: int = 1, energy: EnergyReader | None = None,
                   measure_memory: bool = False, min_seconds: float = 0.0, max_rounds: int | None = None
                   ) -> list[Timing]:
    """Seconds (and joules) per fwd+bwd step of each variant, measured in interleaved rounds.

    Interleaving (A B, B A, A B ...) spreads machine noise evenly over the variants; the warm-up
    steps absorb one-off costs (oneDNN/cuDNN plans, allocator growth, compilation). Fast steps get
    more rounds, up to `max_rounds`, until each variant has run `min_seconds`: a few 10 ms steps say
    little on a busy machine.
    """
    n = batch_size_of(batch)
    with isolated(device):
        prepared: list[tuple[Variant, torch.nn.Module, Batch, int | None, int | None]] = []
        for v in variants:
            m = copy.deepcopy(model)
            if v.prepare is not None:
                prepared_model = v.prepare(m)
                if isinstance(prepared_model, torch.nn.Module):
                    m = prepared_model
            b = v.transform_batch(batch) if v.transform_batch else batch
            for _ in range(warmup):
                train_step(m, b, device=device, autocast_dtype=v.autocast_dtype)
            saved = peak = None
            if measure_memory:
                saved = saved_activation_bytes(m, b, device=device, autocast_dtype=v.autocast_dtype)
                if device.type == "cuda":
                    synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    train_step(m, b, device=device, autocast_dtype=v.autocast_dtype)
                    synchronize(device)
                    peak = int(torch.cuda.max_memory_allocated(device))
            prepared.append((v, m, b, saved, peak))
        seconds: dict[str, list[float]] = {v.name: [] for v in variants}
        joules: dict[str, float] = dict.fromkeys(seconds, 0.0)
        r = 0
        while r < rounds or (r < (max_rounds or rounds) and min(map(sum, seconds.values())) < min_seconds):
            for v, m, b, _, _ in (prepared if r % 2 == 0 else prepared[::-1]):
                synchronize(device)
                e0 = energy() if energy is not None else 0.0
                for _ in range(steps):
                    t0 = time.perf_counter()
                    train_step(m, b, device=device, autocast_dtype=v.autocast_dtype)
                    synchronize(device)
                    seconds[v.name].append(time.perf_counter() - t0)
                if energy is not None:
                    joules[v.name] += energy() - e0
            r += 1
        timings = [Timing(v.name, min(seconds[v.name]), n,
                          joules[v.name] / len(seconds[v.name]) if energy is not None else None, saved, peak,
                          statistics.median(seconds[v.name]), seconds[v.name])
                   for v, _, _, saved, peak in prepared]
        del prepared
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return timings


def compare(model: torch.nn.Module, batch: Batch, baseline: Variant, candidate: Variant, *, device: torch.device,
            steps: int = 2, rounds: int = 3, warmup: int = 1, energy: EnergyReader | None = None,
            measure_memory: bool = False, min_seconds: float = 0.0, max_rounds: int | None = None) -> Comparison:
    """Probe `baseline` and `candidate` side by side (see `probe_variants`)."""
    base, cand = probe_variants(model, batch, [baseline, candidate], device=device, steps=steps, rounds=rounds,
                                warmup=warmup, energy=energy, measure_memory=measure_memory,
                                min_seconds=min_seconds, max_rounds=max_rounds)
    return Comparison(base, cand, energy.provenance if energy is not None else None,
                      energy.source if energy is not None else None)


def device_memory_bytes(device: torch.device) -> int:
    """What the process can use at most: the GPU's memory, or the machine's RAM on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    import psutil

    return int(psutil.virtual_memory().total)


def memory_in_use_bytes(device: torch.device) -> int:
    """Current use: peak allocated GPU memory since the last reset, or the process RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import psutil

    return int(psutil.Process().memory_info().rss)


def module_of(model: torch.nn.Module) -> torch.nn.Module:
    """The module behind a `torch.compile` wrapper (in-place compiled modules are returned as they are)."""
    return getattr(model, "_orig_mod", model)
