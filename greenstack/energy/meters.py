"""Energy meters: one interface over hardware counters (NVML, RAPL) and the TDP/RSS estimates.

Every meter reports CUMULATIVE joules per component ("cpu", "gpu", "ram") since its `start()`, so a
missed sample loses time resolution but never energy. Each meter carries a provenance label and a
source string, so the report can say exactly where a number came from and how much to trust it.

`greenstack.energy.select.select_meters` picks the best available meters and explains, in one line
each, why the others were not used (this is what `greenstack doctor` prints).

Scope: NVML and RAPL read node-wide counters (`scope == "node"`): in a distributed run only one
process per node may read them, otherwise the node's energy is counted once per rank (see
`greenstack.energy.monitor.should_meter`). The TDP and RSS models are process-tree scoped
(`scope == "process"`); `select_meters` points them at the node's process tree root
(`node_process_root_pid`) so that one process per node also covers every local rank.
"""

from __future__ import annotations

import abc
import os
from typing import Any

from greenstack.provenance import Provenance

COMPONENTS: tuple[str, ...] = ("cpu", "gpu", "ram")
METER_KINDS: tuple[str, ...] = ("auto", "nvml", "rapl", "tdp")

# 3 W per 8 GB of DDR3/DDR4 = 0.375 W/GB: the RAM heuristic of codecarbon before v3
# (codecarbon/external/ram.py, citing Crucial's "How much power does memory use?"). Coarse, but
# RAM is usually a few percent of a training run's energy.
DEFAULT_RAM_W_PER_GB = 0.375
DEFAULT_TDP_W = 85.0


class MeterUnavailable(Exception):
    """A meter cannot run on this machine; the message is a one-line human reason, prefixed by the meter."""


class Meter(abc.ABC):
    """Base class of all energy meters.

    Subclasses set `name`, `provenance`, `source`, `components` and `scope`, and implement
    `read_energy_j`. Meters are not thread-safe on their own: `EnergyMonitor` serialises all calls.
    """

    name: str = ""
    provenance: Provenance = "estimated"
    source: str = ""
    components: tuple[str, ...] = ()
    scope: str = "node"  # "node": node-wide counter; "process": this process tree only

    def start(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Reset the cumulative energy to zero at the current instant."""

    @abc.abstractmethod
    def read_energy_j(self) -> dict[str, float]:
        """Cumulative joules per component since `start()` (keys = `components`)."""

    def poll(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Hook for meters that integrate power samples; the monitor thread calls it every interval."""

    def stop(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Take a last sample and release resources; `read_energy_j` still returns the final totals."""

    def info(self) -> dict[str, Any]:
        """Extra details for reports and `greenstack doctor` (device names, matched table entry...)."""
        return {"name": self.name, "provenance": self.provenance, "source": self.source,
                "components": list(self.components), "scope": self.scope}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.source} ({self.provenance})>"


def node_process_root_pid() -> int:
    """The pid whose process tree holds all training processes of this node.

    Under torchrun (TORCHELASTIC_RUN_ID set) every local worker is a child of the elastic agent, so
    metering the agent's tree from local rank 0 covers all ranks of the node; otherwise this process.
    """
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        return os.getppid()
    return os.getpid()
