"""Capture everything needed to continue a run bit-for-bit, and put it back.

The capture is the only part of checkpointing the training loop waits for: tensors are cloned to CPU
memory; serialisation and I/O happen later, off the training thread.
"""

from __future__ import annotations

import copy
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch

from greenstack.engine.state import State
from greenstack.io import jsonable


def _cpu_clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _cpu_clone(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu_clone(v) for v in obj)
    return copy.deepcopy(obj)


@dataclass
class Snapshot:
    """A run's state at an optimizer-step boundary."""

    step: int
    epoch: int
    batch_in_epoch: int
    samples_seen: int
    model: dict[str, torch.Tensor]
    trainer: dict[str, Any]  # optimizer, lr scheduler, grad scaler, policies, torch/loader RNG
    rng: dict[str, Any]  # python/numpy RNG as JSON-able lists
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat())
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"step-{self.step:09d}"


_OLD_KEY = re.compile(r"^\d{2,}:(.+)$")


def policy_keys(names: Sequence[str]) -> list[str]:
    """The keys policy states are saved under: the policy's name; a name used again gets `#2`, `#3`...
    in dispatch order (so reordering differently named policies never mixes their states up)."""
    count: dict[str, int] = {}
    keys = []
    for name in names:
        count[name] = count.get(name, 0) + 1
        keys.append(name if count[name] == 1 else f"{name}#{count[name]}")
    return keys


def saved_policy_states(saved: dict[str, Any]) -> dict[str, Any]:
    """Saved policy states by key; checkpoints written before the keys were names (`"03:amp"`, by list
    position) are read by their names in their saved order."""
    if saved and all(_OLD_KEY.match(k) for k in saved):
        names = [_OLD_KEY.match(k).group(1) for k in saved]  # type: ignore[union-attr]
        return dict(zip(policy_keys(names), saved.values(), strict=True))
    return saved


class PendingSnapshot:
    """A snapshot whose large tensors (parameters, optimizer state) are still being copied.

    Parameters and optimizer state change only in the optimizer step, so they can be copied while the
    next forward/backward runs; `result()` must be awaited before that step (the policy does this at
    AFTER_BACKWARD). Buffers (e.g. BatchNorm statistics, updated by forward) were copied synchronously.
    """

    def __init__(self, snapshot: Snapshot, params: dict[str, torch.Tensor], optim_state: Any) -> None:
        self._snapshot, self._error = snapshot, None
        self._thread = threading.Thread(target=self._copy, args=(params, optim_state), daemon=True,
                                        name="greenstack-snapshot")
        self._thread.start()

    def _copy(self, params: dict[str, torch.Tensor], optim_state: Any) -> None:
        try:
            self._snapshot.model.update({k: v.detach().to("cpu", copy=True) for k, v in params.items()})
            if optim_state is not None:
                self._snapshot.trainer["optimizer"]["state"] = _cpu_clone(optim_state)
        except BaseException as e:  # re-raised in result()
            self._error = e

    def result(self) -> Snapshot:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._snapshot


def capture_async(state: State, meta: dict[str, Any] | None = None) -> PendingSnapshot:
    """Copy small state now and parameters/optimizer state in the background (see PendingSnapshot)."""
    buffers = {name for name, _ in state.model.named_buffers()}
    full = state.model.state_dict()
    params = {k: v for k, v in full.items() if k not in buffers}
    optim_sd = state.optimizer.state_dict() if state.optimizer is not None else None
    snapshot = capture(state, meta, model={k: v.detach().to("cpu", copy=True) for k, v in full.items()
                                           if k in buffers},
                       optimizer=None if optim_sd is None else {"state": {},
                                                                 "param_groups": copy.deepcopy(optim_sd["param_groups"])})
    return PendingSnapshot(snapshot, params, optim_sd["state"] if optim_sd is not None else None)


def capture(state: State, meta: dict[str, Any] | None = None, *, model: dict[str, torch.Tensor] | None = None,
            optimizer: dict[str, Any] | None = None) -> Snapshot:
    """Copy the state to CPU memory (`model`/`optimizer` given = already copied by the caller)."""
    np_state = np.random.get_state()
    if optimizer is None and state.optimizer is not None:
        optimizer = _cpu_clone(state.optimizer.state_dict())
    trainer = {
        "optimizer": optimizer,
        "lr_scheduler": _cpu_clone(state.lr_scheduler.state_dict()) if state.lr_scheduler is not None else None,
        "grad_scaler": _cpu_clone(state.grad_scaler.state_dict()) if state.grad_scaler is not None else None,
        "policies": {key: _cpu_clone(p.state_dict())
                     for key, p in zip(policy_keys([p.name for p in state.policies]), state.policies, strict=True)},
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": [t.clone() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "loader_rng": state.loader_rng.clone() if state.loader_rng is not None else None,
        "tokens_seen": state.tokens_seen,
    }
    rng = {"python": jsonable(random.getstate()),
           "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    if model is None:
        model = {k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()}
    return Snapshot(step=state.step, epoch=state.epoch, batch_in_epoch=state.batch_in_epoch,
                    samples_seen=state.samples_seen, model=model, trainer=trainer, rng=rng, meta=dict(meta or {}))


def _tuple(obj: Any) -> Any:
    if isinstance(obj, list):
        return tuple(_tuple(v) for v in obj)
    return obj


def apply_snapshot(snapshot: Snapshot, state: State) -> None:
    """Restore model, optimizer, schedule, policies, counters and RNG so training continues exactly.

    Policies are restored first, and those with a `restore_model(state)` hook then rebuild the model's
    structure as it was when the snapshot was taken (QAT's fake-quant modules, a distilled student), so
    the saved weights and optimizer state fit the model they are loaded into.
    """
    t = snapshot.trainer
    saved = saved_policy_states(t.get("policies", {}))
    for key, policy in zip(policy_keys([p.name for p in state.policies]), state.policies, strict=True):
        if key in saved:
            policy.load_state_dict(saved[key])
    for policy in state.policies:
        policy.restore_model(state)
    state.model.load_state_dict(snapshot.model)
    if state.optimizer is not None and t.get("optimizer") is not None:
        # a copy: on CPU the optimizer would adopt the snapshot's tensors and update them in place,
        # corrupting a snapshot that is kept (memory tier) and applied again
        state.optimizer.load_state_dict(_cpu_clone(t["optimizer"]))
    if state.lr_scheduler is not None and t.get("lr_scheduler") is not None:
        state.lr_scheduler.load_state_dict(t["lr_scheduler"])
    if state.grad_scaler is not None and t.get("grad_scaler") is not None:
        state.grad_scaler.load_state_dict(t["grad_scaler"])
    torch.set_rng_state(t["torch_rng"])
    if t.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(t["cuda_rng"])
    random.setstate(_tuple(snapshot.rng["python"]))
    kind, keys, pos, has_gauss, cached = snapshot.rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    state.step, state.epoch = snapshot.step, snapshot.epoch
    state.batch_in_epoch, state.samples_seen = snapshot.batch_in_epoch, snapshot.samples_seen
    state.tokens_seen = int(t.get("tokens_seen", 0))
    state.resume = {"loader_rng": t.get("loader_rng"), "batch_in_epoch": snapshot.batch_in_epoch}
