"""The config that determines what training computes, stored in every checkpoint so that resume can
check it continues the same training.

Why: `checkpointing.resume=auto` with a durable URL holding another run's checkpoints used to "resume"
that run under a config that said something else (a different learning rate, even a different model).
Each checkpoint carries the flattened training config; resume compares it with the current one and
refuses any difference the user has not allowed (`checkpointing.resume_allow_changes`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from greenstack.engine.groups import policy_nodes

#: config groups whose values determine the computation (task and its loss, model, data, optimiser and
#: schedule, run length) and top-level keys (the seed); the policy groups whose policies change the maths (`Policy.changes_training`:
#: all but the schedulers and checkpointing) are found in the config itself (engine/groups.py)
TRAINING_GROUPS = ("task", "model", "data", "optim", "trainer")
TRAINING_KEYS = ("seed",)
#: of the trainer group only these change what is computed (the rest: progress, logging, evaluation, device)
TRAINER_KEYS = ("trainer._target_", "trainer.max_duration", "trainer.grad_accum", "trainer.max_grad_norm",
                "trainer.limit_train_batches")
#: keys in the other groups that change where a run runs, not what it computes
NOT_TRAINING = ("data.num_workers", "federated.timeout_s", "federated.backend")
_MISSING = "<absent>"


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, Mapping) and node:
        for key, value in node.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = node


def training_config_groups(body: Mapping[str, Any]) -> list[str]:
    """Policy groups of a config whose policies change what training computes."""
    return list(dict.fromkeys(p.group for p in policy_nodes(body) if p.cls.changes_training))


def training_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The training-determining part of a composed config, flattened to dotted keys (JSON-able)."""
    body = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    flat: dict[str, Any] = {}
    for group in (*TRAINING_GROUPS, *training_config_groups(body)):  # type: ignore[arg-type]
        if group in body:  # type: ignore[operator]
            _flatten(body[group], group, flat)  # type: ignore[index]
    for key in TRAINING_KEYS:
        if key in body:  # type: ignore[operator]
            flat[key] = body[key]  # type: ignore[index]
    return {k: v for k, v in sorted(flat.items())
            if not any(k == n or k.startswith(n + ".") for n in NOT_TRAINING)
            and (not k.startswith("trainer.") or k in TRAINER_KEYS)}


def fingerprint(flat: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a training config."""
    return hashlib.sha256(json.dumps(dict(flat), sort_keys=True, default=str).encode()).hexdigest()


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, value in the checkpoint, value now) for every key that differs; absent keys included."""
    return [(k, saved.get(k, _MISSING), now.get(k, _MISSING)) for k in sorted(set(saved) | set(now))
            if saved.get(k, _MISSING) != now.get(k, _MISSING)]


def allowed(key: str, patterns: Iterable[str]) -> bool:
    """Whether `key` may change on resume: a listed key, a group prefix (`optim`) or a glob (`optim.*`)."""
    return any(key == p or key.startswith(p + ".") or fnmatch.fnmatchcase(key, p) for p in patterns)
