"""`trainer.deterministic: false | true | warn` (Lightning's convention): reproducible kernels and seeds.

Why each switch (PyTorch's reproducibility notes):

- `torch.use_deterministic_algorithms(True)`: ops with a deterministic implementation use it, the rest
  raise (`true`) or warn (`warn`); the warnings are collected and listed in the run's summary.
- `CUBLAS_WORKSPACE_CONFIG=:4096:8`: cuBLAS reuses workspaces non-deterministically unless this is set
  before its first handle is created, so it is set before the model touches the device.
- cuDNN: `deterministic=True` and `benchmark=False` (autotuning picks kernels by timing).
- every DataLoader gets a seeded generator and a `worker_init_fn` that seeds `random`/`numpy` per
  worker from torch's per-worker seed, so augmentation in workers repeats.
- timing-based decisions freeze (`State.deterministic`): auto efficiency policies and acting alerts
  keep the current configuration unless decisions are replayed from a recorded run
  (`efficiency.decisions_from`, greenstack/engine/replay.py).

The process-wide torch switches are restored when the run ends, so a multirun's next job starts clean.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import numpy as np
import torch

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy, Role
from greenstack.engine.reporter import Reporter
from greenstack.engine.state import State
from greenstack.errors import Problem
from greenstack.provenance import Figure

log = logging.getLogger("greenstack")
Mode = bool | Literal["warn"]
CUBLAS_ENV, CUBLAS_VALUE = "CUBLAS_WORKSPACE_CONFIG", ":4096:8"
#: torch's warn_only message: "<op> does not have a deterministic implementation, but you set ..."
_NONDETERMINISTIC = re.compile(r"^(?P<op>.+?) does not have a deterministic implementation")


def check_mode(value: Any, key: str = "trainer.deterministic") -> Problem | None:
    """A Problem when `value` is not false, true or "warn" (the only values Lightning accepts too)."""
    if isinstance(value, bool) or value == "warn":
        return None
    return Problem(key, value, "must be false, true or warn",
                   "trainer.deterministic=true (reproducible, errors on non-deterministic ops) or =warn (report them)")


def seed_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: seed Python's and NumPy's RNGs from the worker's torch seed."""
    del worker_id
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def seed_loaders(loaders: Iterable[Any], seed: int) -> int:
    """Give every DataLoader (and its random sampler) a seeded generator when it has none, and
    `seed_worker`; returns how many loaders.

    Without a generator, a loader draws its shuffle order and its workers' base seed from torch's global
    RNG, so whatever else drew from it before would change them; its own generator makes it independent.
    """
    from torch.utils.data import DataLoader

    n = 0
    for i, loader in enumerate(loaders):
        if not isinstance(loader, DataLoader):
            continue
        if loader.generator is None:
            loader.generator = torch.Generator().manual_seed(seed + 1000 + i)
        sampler = loader.sampler
        if hasattr(sampler, "generator") and sampler.generator is None:  # shuffle=True without a generator
            sampler.generator = loader.generator
        if loader.worker_init_fn is None:
            loader.worker_init_fn = seed_worker
        n += 1
    return n


class Determinism(Policy):
    """Applies the mode around a run (`with determinism.applied():`) and reports it in the summary."""

    role = Role.OBSERVER

    events = frozenset({Event.FIT_START})

    def __init__(self, mode: Mode = False) -> None:
        super().__init__(name="trainer.deterministic")
        self.mode: Mode = mode
        #: op name -> how many times it warned (mode=warn)
        self.nondeterministic_ops: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self.mode is True or self.mode == "warn"

    @contextlib.contextmanager
    def applied(self) -> Iterator[Determinism]:
        """Set the torch switches (and CUBLAS_WORKSPACE_CONFIG) for the run; restore them after."""
        if not self.enabled:
            yield self
            return
        saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                 torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
        if CUBLAS_ENV not in os.environ:  # must precede the first cuBLAS handle; left set (harmless, by design)
            os.environ[CUBLAS_ENV] = CUBLAS_VALUE
        warn_only = self.mode == "warn"
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        try:
            with self._collecting() if warn_only else contextlib.nullcontext():
                yield self
        finally:
            torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
            if self.nondeterministic_ops:
                log.warning("trainer.deterministic=warn: non-deterministic ops ran: %s",
                            ", ".join(f"{op} ×{n}" for op, n in self.nondeterministic_ops.items()))

    @contextlib.contextmanager
    def _collecting(self) -> Iterator[None]:
        """Count torch's non-determinism warnings per op (every occurrence); others pass through."""
        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=r".*does not have a deterministic implementation")
            shown = warnings.showwarning

            def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None,
                            line: str | None = None) -> None:
                match = _NONDETERMINISTIC.match(str(message))
                if match is None:
                    shown(message, category, filename, lineno, file, line)
                    return
                op = match["op"].strip()
                if op not in self.nondeterministic_ops:
                    log.warning("non-deterministic op: %s", op)
                self.nondeterministic_ops[op] = self.nondeterministic_ops.get(op, 0) + 1

            warnings.showwarning = showwarning
            yield

    def __call__(self, event: Event, state: State, reporter: Reporter) -> None:
        reporter.metric("trainer/deterministic", int(self.enabled))

    def summary(self) -> dict[str, Figure]:
        how = {True: "torch.use_deterministic_algorithms(True), cuDNN deterministic without benchmark, "
                     f"{CUBLAS_ENV}={os.environ.get(CUBLAS_ENV, '')}, seeded loaders, timing-based decisions frozen",
               "warn": "as true, but non-deterministic ops warn instead of raising",
               False: "trainer.deterministic=false: fastest kernels, timing-based decisions live"}[self.mode]
        figures = {"trainer/deterministic": Figure(int(self.enabled), "bool", "measured",
                                                   f"trainer.deterministic={str(self.mode).lower()}: {how}")}
        if self.mode == "warn":
            ops = ", ".join(f"{op} ×{n}" for op, n in self.nondeterministic_ops.items()) or "none"
            figures["trainer/nondeterministic_ops"] = Figure(len(self.nondeterministic_ops), "count", "measured",
                                                             f"ops that warned under warn_only: {ops}")
        return figures
