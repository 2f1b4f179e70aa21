"""torch.compile, in place and with a fallback.

`nn.Module.compile()` compiles the module's call in place: parameter names and the module object stay
the same, so the optimizer, state dicts, checkpoints and the final safetensors file are unaffected
(a `torch.compile(model)` wrapper would prefix every key with `_orig_mod.`). Compilation happens on
the first call, so `try_compile` runs one training step on the real batch at once and undoes that
step's side effects (gradients, BatchNorm statistics, RNG); any failure leaves the model eager.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from greenstack.efficiency.probe import Batch, Timing, isolated, module_of, synchronize, train_step


@dataclass
class CompileResult:
    """Whether compilation worked, how long the first (compiling) step took, and why not if it failed."""

    ok: bool
    reason: str
    compile_s: float


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_orig_mod")


def uncompile(model: torch.nn.Module) -> None:
    """Return an in-place compiled module to eager execution (there is no public inverse of compile())."""
    model._compiled_call_impl = None  # type: ignore[attr-defined]


@contextmanager
def restored(model: torch.nn.Module) -> Iterator[None]:
    """Undo what training steps do to a model besides its parameters: buffers (BN stats) and grads."""
    buffers = {name: b.detach().clone() for name, b in module_of(model).named_buffers()}
    try:
        yield
    finally:
        with torch.no_grad():
            for name, b in module_of(model).named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])
        model.zero_grad(set_to_none=True)


def compile_in_place(model: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None,
                     dynamic: bool | None = None, fullgraph: bool = False) -> None:
    """`model.compile(...)`: lazily compiled on the next call (the plain-function form of the policy)."""
    options: dict[str, Any] = {"backend": backend, "fullgraph": fullgraph, "dynamic": dynamic}
    if mode is not None:
        options["mode"] = mode
    model.compile(**options)


def try_compile(model: torch.nn.Module, batch: Batch, *, device: torch.device,
                autocast_dtype: torch.dtype | None = None, backend: str = "inductor", mode: str | None = None,
                dynamic: bool | None = None, fullgraph: bool = False) -> CompileResult:
    """Compile in place and run one fwd+bwd to trigger compilation; on any error fall back to eager."""
    t0 = time.perf_counter()
    try:
        compile_in_place(model, backend=backend, mode=mode, dynamic=dynamic, fullgraph=fullgraph)
        with isolated(device), restored(model):
            train_step(model, batch, device=device, autocast_dtype=autocast_dtype)
            synchronize(device)
    except Exception as e:  # noqa: BLE001 - any compiler failure means: train eagerly, say why
        uncompile(model)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return CompileResult(False, f"{type(e).__name__}: {first}", time.perf_counter() - t0)
    return CompileResult(True, f"backend={backend}" + (f" mode={mode}" if mode else ""), time.perf_counter() - t0)


def time_compiled_vs_eager(model: torch.nn.Module, batch: Batch, *, device: torch.device,
                           autocast_dtype: torch.dtype | None = None, steps: int = 2, rounds: int = 3,
                           energy: Any = None) -> tuple[Timing, Timing]:
    """(eager, compiled) fwd+bwd timings of an already compiled model, toggled in place and restored."""
    compiled_call = model._compiled_call_impl  # type: ignore[attr-defined]
    seconds: dict[bool, list[float]] = {False: [], True: []}
    joules = {False: 0.0, True: 0.0}
    n = int(batch["labels"].shape[0])
    try:
        with isolated(device), restored(model):
            for use in (False, True):  # warm-up (the compiled graph may specialise again)
                model._compiled_call_impl = compiled_call if use else None  # type: ignore[attr-defined]
                train_step(model, batch, device=device, autocast_dtype=autocast_dtype)
            for r in range(rounds):
                for use in ((False, True) if r % 2 == 0 else (True, False)):
                    model._compiled_call_impl = compiled_call if use else None  # type: ignore[attr-defined]
                    synchronize(device)
                    e0 = energy() if energy is not None else 0.0
                    for _ in range(steps):
                        t0 = time.perf_counter()
                        train_step(model, batch, device=device, autocast_dtype=autocast_dtype)
                        synchronize(device)
                        seconds[use].append(time.perf_counter() - t0)
                    if energy is not None:
                        joules[use] += energy() - e0
    finally:
        model._compiled_call_impl = compiled_call  # type: ignore[attr-defined]

    def timing(use: bool) -> Timing:
        return Timing("compiled" if use else "eager", min(seconds[use]), n,
                      joules[use] / (rounds * steps) if energy is not None else None,
                      median_s=statistics.median(seconds[use]), steps_s=seconds[use])

    return timing(False), timing(True)
