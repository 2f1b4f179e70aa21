"""Which config groups hold policies, found from the composed config itself (no list of group names).

Why: a new policy group used to be registered in four places (the runner's group tuple, validate's
construct list, the checkpoint fingerprint, the Slurm submitter). Now a group is a policy group because
its nodes' `_target_`s are `Policy` classes: adding one is a `conf/<group>/<option>.yaml` plus the module
holding the class. A group option is a map of named nodes (`efficiency.amp`, `policies.early_stopping`);
a group whose option is a single node (`scheduler`, `checkpointing`, `federated`) is the map with one
node named after the group, so its overrides stay short (`checkpointing.resume=auto`).

Dispatch order: the policies' `placement` (start-time schedulers first, checkpointing last, so a
snapshot sees every other policy's step), then the order the groups appear in the composed config
(`train.yaml`'s defaults list, then groups added with `+group=option`), then the order inside a group.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from greenstack.engine.policy import PLACEMENTS, Policy

#: top-level keys that are never policy groups (Hydra's own node)
NOT_GROUPS = frozenset({"hydra"})


@dataclass(frozen=True)
class PolicyNode:
    """One policy of the composed config: where it is (`key`, `group`) and what builds it."""

    key: str
    group: str
    node: Any
    cls: type[Policy]

    @property
    def placement(self) -> str:
        return self.cls.placement


def target_class(node: Any) -> type | None:
    """The class a config node's `_target_` names, or None (no target, not a class, not importable:
    validate reports an unimportable target, with close names)."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        return None
    module_name, _, attr = str(node["_target_"]).rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attr, None) if module_name else None
    except ImportError:
        return None
    return found if isinstance(found, type) else None


def _is_policy(node: Any) -> bool:
    cls = target_class(node)
    return cls is not None and issubclass(cls, Policy)


def group_nodes(cfg: Mapping[str, Any], group: str) -> list[tuple[str, Any]]:
    """(key, node) of every `_target_` node in a policy group, the single-node shape included."""
    node = cfg.get(group)
    if not isinstance(node, Mapping):
        return []
    if "_target_" in node:
        return [(group, node)]
    return [(f"{group}.{name}", spec) for name, spec in node.items()
            if isinstance(spec, Mapping) and "_target_" in spec and spec["_target_"] is not None]


def policy_groups(cfg: Mapping[str, Any]) -> list[str]:
    """Top-level config groups that hold policies, in config order."""
    groups = []
    for group in cfg:
        if group in NOT_GROUPS:
            continue
        if any(_is_policy(spec) for _, spec in group_nodes(cfg, str(group))):
            groups.append(str(group))
    return groups


def policy_nodes(cfg: Mapping[str, Any], groups: Iterable[str] | None = None) -> list[PolicyNode]:
    """Every policy node of `groups` (default: all policy groups), in dispatch order. A node of a policy
    group whose target is not a Policy is returned with `cls` Policy so that building it fails loudly."""
    found = []
    for group in policy_groups(cfg) if groups is None else groups:
        for key, spec in group_nodes(cfg, group):
            cls = target_class(spec)
            found.append(PolicyNode(key, group, spec, cls if cls is not None and issubclass(cls, Policy) else Policy))
    return sorted(found, key=lambda p: PLACEMENTS.index(p.placement))  # stable: config order otherwise
