"""Batch-size search before the first step, with the learning rate scaled by a rule."""

from __future__ import annotations

import copy
import logging
import time
from typing import Annotated, Any, Literal, Protocol

import torch

from greenstack.efficiency.batch_size import (
    lr_scale_factor,
    scale_learning_rate_,
    search_batch_size,
)
from greenstack.efficiency.probe import energy_reader_from, isolated, synchronize, train_step
from greenstack.engine.events import Event
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import between, checked
from greenstack.policies.efficiency._common import (
    FROZEN_WHY,
    Count,
    EfficiencyPolicy,
    Enabled,
    Speedup,
    config_key,
    is_number,
    sample_batch,
    train_loader_of,
)
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")


class MemoryProbe(Protocol):
    """Peak memory of a trial: `reset(batch_size)` before, `sample()` after each forward, `peak_bytes()` after."""

    def limit_bytes(self) -> int: ...
    def reset(self, batch_size: int) -> None: ...
    def sample(self) -> None: ...
    def peak_bytes(self) -> int: ...


class DeviceMemory:
    """GPU: the caching allocator's peak; CPU: the highest RSS seen after a forward (activations alive)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._peak = 0

    def limit_bytes(self) -> int:
        from greenstack.efficiency.probe import device_memory_bytes

        return device_memory_bytes(self.device)

    def reset(self, batch_size: int) -> None:
        del batch_size
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._peak = 0
        self.sample()

    def sample(self) -> None:
        if self.device.type != "cuda":
            import psutil

            self._peak = max(self._peak, psutil.Process().memory_info().rss)

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return self._peak


class BatchSizeSearch(EfficiencyPolicy):
    """Finds the batch size before the first step (see `greenstack.efficiency.batch_size`).

    Trials run on a copy of the model and optimizer with batches of the first N training samples, so
    the run's weights, data order and RNG are untouched. When the chosen batch differs, the loop's
    `set_batch_size` rebuilds the loader and re-plans the run, and the LR is scaled by `lr_scaling`
    (`sqrt` suits Adam-family optimizers, `linear` SGD).
    """

    key = "batch_size"
    events = frozenset({Event.FIT_START})

    @checked(config_key)
    def __init__(self, enabled: Enabled = True,
                 memory_fraction: Annotated[float, between(0, 1, low_open=True)] = 0.8,
                 max_batch_size: Count = 1024, min_gain: Speedup = 1.05,
                 lr_scaling: Literal["linear", "sqrt", "none"] = "sqrt",
                 probe_steps: Count = 1, probe_rounds: Count = 3, memory_probe: Any = None) -> None:
        super().__init__(enabled, [])
        self.memory_fraction, self.max_batch_size, self.min_gain = float(memory_fraction), max_batch_size, float(min_gain)
        self.lr_scaling, self.probe_steps, self.probe_rounds = lr_scaling, probe_steps, probe_rounds
        self.memory_probe = memory_probe
        self.chosen: int | None = None
        self.lr_factor = 1.0

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        if self.decided:
            return
        restored = None if self.restored is None else self.restored.get("batch_size")
        if state.step > 0:  # resumed: the loop can only change the batch size before the first step
            if restored is not None and restored != state.batch_size:
                self.warn(state, reporter, f"resumed at step {state.step}: the loop cannot switch to the searched batch "
                                 f"size {restored}; continuing with {state.batch_size}")
            self.decide(state, reporter, False, f"resumed run (step {state.step}); batch size {state.batch_size}")
            return
        loader = train_loader_of(state)
        if loader is None or state.set_batch_size is None or not hasattr(loader, "dataset"):
            self.warn(state, reporter, "no effect — this loop exposes no train DataLoader to rebuild")
            self.decide(state, reporter, False, "no train DataLoader")
            return
        start = int(state.batch_size or loader.batch_size or 1)
        if self.restored is not None and isinstance(self.restored.get("on"), bool):  # replayed before step 1
            self._apply_recorded(state, reporter, start)
            return
        if state.deterministic:
            self.decide(state, reporter, False, f"kept batch size {start} ({FROZEN_WHY})")
            return
        limit_n = min(self.max_batch_size, len(loader.dataset))
        memory = self.memory_probe or DeviceMemory(state.device)
        energy = energy_reader_from(state)
        basis = "samples/J" if energy is not None and energy.provenance == "measured" else "samples/s"
        peak_bytes, measure = self._trial_fns(state, loader, memory, energy)
        result = search_batch_size(peak_bytes, measure, start=start, max_batch_size=max(limit_n, start),
                                   limit_bytes=memory.limit_bytes(), memory_fraction=self.memory_fraction,
                                   min_gain=self.min_gain, basis=basis)
        del peak_bytes, measure
        if state.device.type == "cuda":
            torch.cuda.empty_cache()
        self.chosen = result.chosen
        source = (f"{len(result.trials)} batch sizes tried on the first training samples ({state.device}); fitting "
                  f"ones timed in {self.probe_rounds} interleaved rounds x {self.probe_steps} fwd+bwd+optimizer "
                  f"steps (fastest step); basis {basis}")
        self.figures["efficiency/batch_size_chosen"] = Figure(result.chosen, "samples", "measured", source)
        if result.max_fit is not None:
            self.figures["efficiency/batch_size_max_fit"] = Figure(
                result.max_fit, "samples", "measured",
                f"largest power-of-two multiple of {start} within {self.memory_fraction:.0%} of device memory "
                f"(capped at {limit_n})")
        if result.gain != float("inf"):
            self.figures["efficiency/batch_size_gain"] = Figure(result.gain, "x", "measured",
                                                                f"{basis} at {result.chosen} vs {start}; {source}")
        trials = [t.to_dict() for t in result.trials]
        if result.chosen == start:
            why = (f"no other batch measured ≥ {self.min_gain:g}× better" if result.max_fit
                   else "no batch size fits the memory budget; keeping the configured one")
            self.decide(state, reporter, False, f"kept batch size {start} ({why})", trials=trials, basis=basis)
            return
        state.set_batch_size(result.chosen)
        self.lr_factor = lr_scale_factor(start, result.chosen, self.lr_scaling)  # type: ignore[arg-type]
        scale_learning_rate_(state.optimizer, state.lr_scheduler, self.lr_factor)
        reporter.metric("efficiency/batch_size", result.chosen)
        gain = "" if result.gain == float("inf") else f"{result.gain:.2f}× {basis}, "
        self.decide(state, reporter, True, f"batch size {start} → {result.chosen} ({gain}largest fit {result.max_fit}); "
                                 f"LR ×{self.lr_factor:.3g} ({self.lr_scaling} rule)", trials=trials, basis=basis,
                    lr_factor=self.lr_factor, batch_size=result.chosen)

    def _apply_recorded(self, state: State, reporter: Reporter, start: int) -> None:
        """The recorded run's choice, with its LR factor: no trial runs."""
        assert self.restored is not None and state.set_batch_size is not None
        chosen = self.restored.get("batch_size")
        if not self.restored["on"] or not isinstance(chosen, int) or chosen == start:
            self.decide(state, reporter, False, f"kept batch size {start} ({self.restored_why})")
            return
        state.set_batch_size(chosen)
        factor = self.restored.get("lr_factor")
        self.lr_factor = float(factor) if is_number(factor) else lr_scale_factor(start, chosen, self.lr_scaling)  # type: ignore[arg-type]
        scale_learning_rate_(state.optimizer, state.lr_scheduler, self.lr_factor)
        self.chosen = chosen
        reporter.metric("efficiency/batch_size", chosen)
        self.decide(state, reporter, True, f"batch size {start} → {chosen}; LR ×{self.lr_factor:.3g} ({self.restored_why})",
                    lr_factor=self.lr_factor, batch_size=chosen)

    def _trial_fns(self, state: State, loader: Any, memory: Any, energy: Any):  # noqa: ANN202 - closures
        """(peak_bytes(n), measure(sizes)) on a copy of the model and optimizer."""
        model = copy.deepcopy(state.model)
        optimizer = _same_optimizer(state.optimizer, model) if state.optimizer is not None else None
        model.register_forward_hook(lambda *_: memory.sample())  # activations are alive here
        device, dtype = state.device, state.autocast_dtype
        batches: dict[int, dict[str, Any]] = {}

        def step(n: int) -> None:
            train_step(model, batches[n], device=device, autocast_dtype=dtype, optimizer=optimizer)

        def peak_bytes(n: int) -> int:
            with isolated(device):
                batches[n] = sample_batch(loader, n, device)
                memory.reset(n)
                try:
                    step(n)
                except Exception:
                    batches.pop(n)
                    raise
                synchronize(device)
                return memory.peak_bytes()

        def measure(sizes: list[int]) -> dict[int, tuple[float | None, float | None]]:
            seconds: dict[int, list[float]] = {n: [] for n in sizes}
            joules = dict.fromkeys(sizes, 0.0)
            with isolated(device):
                for r in range(self.probe_rounds):
                    for n in (sizes if r % 2 == 0 else sizes[::-1]):
                        e0 = energy() if energy is not None else 0.0
                        for _ in range(self.probe_steps):
                            t0 = time.perf_counter()
                            step(n)
                            synchronize(device)
                            seconds[n].append(time.perf_counter() - t0)
                        if energy is not None:
                            joules[n] += energy() - e0
            steps = self.probe_rounds * self.probe_steps
            return {n: (n / min(seconds[n]), n * steps / joules[n] if energy is not None and joules[n] > 0 else None)
                    for n in sizes}

        return peak_bytes, measure

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "batch_size": self.chosen, "lr_factor": self.lr_factor}


def _same_optimizer(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> torch.optim.Optimizer:
    """A fresh optimizer of the run's class and settings for the copy (its step costs the same)."""
    import inspect

    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return type(optimizer)(model.parameters(), **defaults)
