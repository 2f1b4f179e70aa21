"""The `federated` group's settings: regions, world size, and the checks that run before any process starts.

`check_federated(cfg)` is called by `greenstack.validate.validate_config`, so a bad geo setup (a region
without a carbon source, zero capacity, a compression ratio outside (0, 1], a launch whose world size
does not match the YAML) is reported with every other config problem, before workers are spawned.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from greenstack.errors import ConfigError, Problem

ROLES = ("coordinator", "worker")
#: the _target_ suffixes that make a `federated` node ask for several processes
GEO_TARGETS = ("GeoTraining",)
DDP_TARGETS = ("DataParallel",)


@dataclass(frozen=True)
class Region:
    """One region: how many workers it hosts, its role, and the carbon source its workers account with."""

    name: str
    capacity: int
    role: str = "worker"
    carbon: dict[str, Any] = field(default_factory=dict)


def parse_regions(regions: Any, key: str = "federated.regions") -> list[Region]:
    """Regions in rank order (coordinator first), or ConfigError listing every problem."""
    problems: list[Problem] = []
    if not isinstance(regions, Mapping) or not regions:
        raise ConfigError(Problem(key, regions, "needs at least one region",
                                  "e.g. regions: {eu: {capacity: 2, role: coordinator, carbon: {zone: DE-LU}}}"))
    out: list[Region] = []
    for name, spec in regions.items():
        path = f"{key}.{name}"
        if not isinstance(spec, Mapping):
            problems.append(Problem(path, spec, "a region is a mapping with capacity, role and carbon"))
            continue
        unknown = set(spec) - {"capacity", "role", "carbon"}
        for k in sorted(unknown):
            problems.append(Problem(f"{path}.{k}", spec[k], "not a region setting", "use capacity, role, carbon"))
        capacity = spec.get("capacity", 1)
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
            problems.append(Problem(f"{path}.capacity", capacity, "must be a whole number of workers >= 0"))
            capacity = 0
        role = spec.get("role", "worker")
        if role not in ROLES:
            problems.append(Problem(f"{path}.role", role, "unknown role", f"one of {', '.join(ROLES)}"))
        carbon = spec.get("carbon")
        if not isinstance(carbon, Mapping) or not carbon:
            problems.append(Problem(f"{path}.carbon", carbon, "region has no carbon source",
                                    "e.g. carbon: {kind: embedded, zone: GB} (every worker accounts its "
                                    "emissions with its region's grid)"))
            carbon = {}
        else:
            from greenstack.measure import CarbonConfig

            try:
                CarbonConfig(**{k: v for k, v in carbon.items() if k != "_target_"})
            except ConfigError as e:
                problems.extend(Problem(f"{path}.carbon.{p.key.split('.')[-1]}", p.value, p.reason, p.fix)
                                for p in e.problems)
            except TypeError as e:
                problems.append(Problem(f"{path}.carbon", dict(carbon), f"not a carbon setting: {e}"))
        out.append(Region(str(name), int(capacity), str(role), dict(carbon)))
    coordinators = [r.name for r in out if r.role == "coordinator"]
    if len(coordinators) > 1:
        problems.append(Problem(key, coordinators, "more than one coordinator region", "mark exactly one"))
    if out and sum(r.capacity for r in out) == 0:
        problems.append(Problem(key, {r.name: r.capacity for r in out}, "total capacity is zero: no worker would run",
                                "give at least one region capacity >= 1"))
    if problems:
        raise ConfigError(problems)
    return sorted(out, key=lambda r: r.role != "coordinator")  # stable: YAML order otherwise


def rank_regions(regions: list[Region]) -> list[Region]:
    """The region of each global rank: ranks fill regions in order (coordinator's region holds rank 0)."""
    return [r for r in regions for _ in range(r.capacity)]


def federated_world_size(node: Any) -> int:
    """Processes a `federated` config node asks for (1 for `none`)."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        return 1
    target = str(node["_target_"])
    if target.endswith(GEO_TARGETS):
        try:
            return len(rank_regions(parse_regions(node.get("regions"))))
        except ConfigError:
            return 1
    if target.endswith(DDP_TARGETS):
        workers = node.get("workers", 1)
        return workers if isinstance(workers, int) and workers > 0 else 1
    return 1


def check_federated(cfg: Any) -> list[Problem]:
    """Problems a federated config has that its policy cannot see alone (the launch's world size)."""
    from omegaconf import DictConfig, OmegaConf

    node = cfg.get("federated") if hasattr(cfg, "get") else None
    if isinstance(node, DictConfig):
        try:
            node = OmegaConf.to_container(node, resolve=True)
        except Exception:  # noqa: BLE001 - unresolvable values are reported by the generic checks
            return []
    if not isinstance(node, Mapping) or "_target_" not in node:
        return []
    expected = federated_world_size(node)
    raw = os.environ.get("WORLD_SIZE")
    if raw is None or "RANK" not in os.environ:
        return []
    try:
        actual = int(raw)
    except ValueError:
        return [Problem("WORLD_SIZE", raw, "not an integer")]
    if actual != expected:
        what = "the regions' total capacity" if str(node["_target_"]).endswith(GEO_TARGETS) else "federated.workers"
        return [Problem("federated", f"WORLD_SIZE={actual}", f"the launch has {actual} processes but {what} is "
                        f"{expected}", f"launch {expected} processes (torchrun --nproc-per-node / srun --ntasks) "
                        "or change the YAML")]
    return []
