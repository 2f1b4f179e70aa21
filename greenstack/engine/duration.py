"""Duration strings for schedules and policy windows: "2ep", "500ba", "0.3dur", "1000sp".

`ep` = epochs, `ba` = optimizer steps (batches), `sp` = samples, `dur` = fraction of the whole run.
Everything resolves to an optimizer step index once the loop knows its length.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from greenstack.errors import ConfigError

Unit = Literal["ep", "ba", "sp", "dur"]
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)(?:e([+-]?\d+))?\s*(ep|ba|sp|dur)\s*$")
_HINT = 'use a number and a unit: "2ep" (epochs), "500ba" (steps), "1000sp" (samples), "0.3dur" (fraction)'


@dataclass(frozen=True)
class Duration:
    """A length of training in one of the four units."""

    value: float
    unit: Unit

    @classmethod
    def parse(cls, text: str | int | Duration, *, key: str = "duration") -> Duration:
        """Parse a duration string; a bare integer means steps. Raises ConfigError naming `key`."""
        if isinstance(text, Duration):
            return text
        if isinstance(text, bool):
            raise ConfigError(f"expected a duration string, got a boolean ({_HINT})", key=key, value=text)
        if isinstance(text, int):
            return cls(float(text), "ba")
        match = _PATTERN.match(str(text))
        if not match:
            raise ConfigError(f"not a duration ({_HINT})", key=key, value=text)
        number = float(match.group(1)) * (10 ** int(match.group(2)) if match.group(2) else 1)
        unit: Unit = match.group(3)  # type: ignore[assignment]
        if unit == "dur" and not 0.0 <= number <= 1.0:
            raise ConfigError("a fraction of the run must be within [0, 1]", key=key, value=text)
        if unit in ("ep", "ba", "sp") and number < 0:
            raise ConfigError("a duration cannot be negative", key=key, value=text)
        return cls(number, unit)

    def to_steps(self, *, steps_per_epoch: int, total_steps: int | None = None, batch_size: int = 1) -> int:
        """The optimizer step index this duration corresponds to."""
        if self.unit == "ba":
            return int(round(self.value))
        if self.unit == "ep":
            return int(round(self.value * steps_per_epoch))
        if self.unit == "sp":
            return int(round(self.value / max(batch_size, 1)))
        if total_steps is None:
            raise ValueError("a 'dur' duration needs the run's total number of steps")
        return int(round(self.value * total_steps))

    def __str__(self) -> str:
        value = int(self.value) if self.value.is_integer() and self.unit != "dur" else self.value
        return f"{value}{self.unit}"
