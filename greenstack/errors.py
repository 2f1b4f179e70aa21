"""Errors that greenstack reports to users without a traceback.

A `ConfigError` carries one or more `Problem`s so that validation can list every mistake at once
(key path, offending value, why, how to fix) instead of stopping at the first.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


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


# -- constraints declared once, on the parameters ---------------------------------------------------
@dataclass(frozen=True)
class Check:
    """A constraint declared on a parameter, `Annotated[int, at_least(1)]`, checked by `checked`
    (and so by `greenstack validate`, which constructs policies and config objects)."""

    ok: Callable[[Any], bool]
    reason: str
    fix: str = ""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bound(op: Callable[[Any], bool], words: str, integer: bool, fix: str) -> Check:
    kind = "an integer" if integer else "a number"
    test = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if integer else _number
    return Check(lambda v: test(v) and op(v), f"must be {kind} {words}", fix)


def at_least(n: float, *, integer: bool = False, fix: str = "") -> Check:
    return _bound(lambda v: v >= n, f">= {n:g}", integer, fix)


def above(n: float, *, integer: bool = False, fix: str = "") -> Check:
    return _bound(lambda v: v > n, f"> {n:g}", integer, fix)


def between(low: float, high: float, *, low_open: bool = False, high_open: bool = False, fix: str = "") -> Check:
    """low <= v <= high; `*_open` excludes an end ([0, 1), (0, 1])."""
    words = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    return _bound(lambda v: (v > low if low_open else v >= low) and (v < high if high_open else v <= high),
                  words, False, fix)


def is_bool() -> Check:
    return Check(lambda v: isinstance(v, bool), "must be true or false")


def _checks(tp: Any) -> tuple[list[Check], tuple[Any, ...], bool]:
    """(Checks, Literal choices, None allowed) of an annotation."""
    checks: list[Check] = []
    choices: tuple[Any, ...] = ()
    optional = False
    if typing.get_origin(tp) is typing.Annotated:
        tp, *meta = typing.get_args(tp)
        checks += [m for m in meta if isinstance(m, Check)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        optional = type(None) in args
        literal_only = all(typing.get_origin(a) is typing.Literal for a in args if a is not type(None))
        for arg in args:
            sub, sub_choices, _ = _checks(arg)
            checks += sub
            choices += sub_choices if literal_only else ()  # `bool | Literal["warn"]`: the type check's job
    elif typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
    return checks, choices, optional


def declared_problems(fn: Callable[..., Any], arguments: Mapping[str, Any], prefix: str) -> list[Problem]:
    """Every argument that breaks a constraint declared on `fn`'s parameters (Checks in `Annotated`,
    `Literal` choices), each keyed `prefix.name`."""
    hints = typing.get_type_hints(inspect.unwrap(fn), include_extras=True)
    problems = []
    for name, value in arguments.items():
        checks, choices, optional = _checks(hints.get(name, Any))
        if value is None and optional:
            continue
        key = f"{prefix}.{name}" if prefix else name
        if choices and value not in choices:
            problems.append(Problem(key, value, f"must be {' or '.join(repr(c) for c in choices)}"))
            continue
        problems += [Problem(key, value, c.reason, c.fix) for c in checks if not c.ok(value)]
    return problems


def checked(key: str | Callable[[Any], str]) -> Callable[[F], F]:
    """Check a constructor's declared constraints; a ConfigError lists every broken one at once, with the
    body's own problems too, each prefixed with its config key (`key`, or `key(self)` for a key per
    subclass)."""

    def wrap(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def checked_fn(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
            prefix = key if isinstance(key, str) else key(bound.arguments.get("self"))
            problems = declared_problems(fn, arguments, prefix)
            if not problems:
                return fn(*args, **kwargs)
            # The body still runs so that its own checks (e.g. a window's start/end) join the list:
            # one ConfigError names every problem. Anything else it raises on the bad values is moot.
            try:
                fn(*args, **kwargs)
            except ConfigError as body_error:
                listed = {p.key for p in problems}
                problems += [p for p in body_error.problems if p.key not in listed]
            except Exception:  # noqa: BLE001 - the declared problems already explain the failure
                pass
            raise ConfigError(problems)

        return checked_fn  # type: ignore[return-value]

    return wrap
