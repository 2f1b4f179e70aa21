"""Errors that greenstack reports to users without a traceback.

A `ConfigError` carries one or more `Problem`s so that validation can list every mistake at once
(key path, offending value, why, how to fix) instead of stopping at the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input."""

    key: str
    value: Any
    reason: str
    fix: str = ""

    def format(self) -> str:
        text = f"{self.key}: {self.reason}" if isinstance(self.value, str) and not self.value else f"{self.key} = {self.value!r}: {self.reason}"
        return f"{text} ({self.fix})" if self.fix else text


class GreenstackError(Exception):
    """Base class: errors the CLI prints as one clear message and exits on (no traceback)."""

    exit_code = 1


class ConfigError(GreenstackError):
    """Bad configuration or input data; carries every problem found."""

    exit_code = 2

    def __init__(self, problems: Problem | Iterable[Problem] | str, *, key: str = "", value: Any = None,
                 fix: str = "") -> None:
        if isinstance(problems, str):
            problems = [Problem(key or "<input>", value, problems, fix)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems: list[Problem] = list(problems)
        super().__init__(self._message())

    def _message(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0].format()
        lines = [f"{len(self.problems)} problems:"] + [f"  - {p.format()}" for p in self.problems]
        return "\n".join(lines)


class RunInterrupted(KeyboardInterrupt):
    """SIGTERM during a run, raised in the main thread so the run can write its partial accounting.

    A KeyboardInterrupt (not an Exception) so that nothing that catches `Exception` swallows it;
    the CLI exits with the conventional 128 + signal number.
    """

    def __init__(self, signum: int) -> None:
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class DataError(ConfigError):
    """Input data (carbon traces, hardware tables, datasets) failed validation."""


def collecting(problems: list[Problem], fn: Callable[[], Any], default: Any = None) -> Any:
    """`fn()`, or `default` after adding its ConfigError's problems to `problems` (to report all at once)."""
    try:
        return fn()
    except ConfigError as err:
        problems.extend(err.problems)
        return default
