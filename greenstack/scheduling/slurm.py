"""Slurm `--begin` values for a chosen start, so a job waits in the queue instead of on its node.

Why a pure function: under the Slurm launcher the scheduler must not sleep inside an allocation
(the GPUs would idle while reserved); the launcher submits with `--begin` instead. Slurm reads
`--begin=now+N` (seconds) or an absolute `YYYY-MM-DDTHH:MM:SS` in the controller's local time.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

from greenstack.errors import ConfigError, Problem


def slurm_begin(start: datetime, now: datetime | None = None, *, controller_tz: str | None = None) -> str:
    """The `sbatch --begin` value for `start`: 'now' if due, 'now+SECONDS' relative to `now`, or
    an absolute local time of the controller when `controller_tz` (e.g. 'Europe/Berlin') is given.
    """
    if start.tzinfo is None:
        raise ConfigError(Problem("start", str(start), "time without a timezone", "use an aware UTC datetime"))
    if controller_tz is not None:
        try:
            tz = ZoneInfo(controller_tz)
        except Exception:  # noqa: BLE001 - any lookup failure means an unknown zone name
            raise ConfigError(Problem("controller_tz", controller_tz, "unknown time zone",
                                      "an IANA name such as Europe/Berlin or UTC")) from None
        return start.astimezone(tz).strftime("%Y-%m-%dT%H:%M:%S")
    now = now or datetime.now(timezone.utc)
    seconds = (start - now).total_seconds()
    return "now" if seconds <= 0 else f"now+{math.ceil(seconds)}"


#: set by the Slurm launcher on a job it submitted with a planned --begin (ISO-8601 UTC start, saving %)
PLANNED_START_ENV = "GREENSTACK_PLANNED_START"
PLANNED_SAVING_ENV = "GREENSTACK_PLANNED_SAVING_PCT"
