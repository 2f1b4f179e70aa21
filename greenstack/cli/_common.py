"""What every `greenstack` subcommand shares: the console, one way to print problems and errors, the
argparse flavour that reports usage errors as ConfigError, and whether tracebacks are wanted."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from greenstack.console import plural
from greenstack.errors import ConfigError, Problem

DEBUG_ENV = "GREENSTACK_DEBUG"


def debug() -> bool:
    """Tracebacks wanted: `main` sets GREENSTACK_DEBUG=1 for a `--debug` invocation (workers inherit it)."""
    return os.environ.get(DEBUG_ENV) == "1"


def console(stderr: bool = True) -> Any:
    """The rich console commands print to (stderr unless told otherwise)."""
    from greenstack.console import make_console

    return make_console(stderr=stderr)


def print_problems(problems: Sequence[Problem], title: str) -> None:
    """One problem: one line naming the key; several: a table of them all."""
    from rich.table import Table

    if len(problems) == 1:
        import re

        head = re.sub(r"\s*\(\d+ problems?\)|:? \d+ problems?", "", title)  # the title without its count
        console().print(f"[bold red]{head}:[/] {problems[0].format()}", markup=True, soft_wrap=True,
                         highlight=False)
        return

    table = Table(title=title, title_justify="left", show_lines=False, expand=False)
    for col in ("key", "value", "problem", "how to fix"):
        table.add_column(col, overflow="fold")
    for p in problems:
        table.add_row(p.key, "" if p.value is None else str(p.value), p.reason, p.fix)
    console().print(table)


def report_error(error: BaseException) -> int:
    """Print a greenstack error (several problems as a table); returns its exit code."""
    if isinstance(error, ConfigError) and len(error.problems) > 1:
        print_problems(error.problems, f"greenstack: {plural(len(error.problems), 'problem')}")
    else:
        console().print(f"[bold red]greenstack error:[/] {error}", markup=True, soft_wrap=True)
    return getattr(error, "exit_code", 1)


def wants_help(argv: Sequence[str]) -> bool:
    """`-h`/`--help` among the arguments."""
    return any(a in ("-h", "--help") for a in argv)


def help_exit(argv: Sequence[str], show: Callable[[], None]) -> int | None:
    """A command group called bare or with `-h` first: show its help and return the exit code (2 when
    bare: a command was expected); None when there is a command to run."""
    if argv and argv[0] not in ("-h", "--help"):
        return None
    show()
    return 0 if argv else 2


class ArgParser(argparse.ArgumentParser):
    """argparse that reports usage errors as ConfigError (printed by the CLI, exit 2, no traceback)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(Problem(self.prog, None, message, f"see `{self.prog} --help`"))


def table_console() -> Any:
    """A stderr console that does not soft-wrap (tables of report/pool/audit)."""
    from greenstack.console import make_console

    return make_console(soft_wrap=False)


def print_json(obj: Any) -> None:
    """One JSON document on stdout (numpy/datetime values as text)."""
    from greenstack.io import dumps

    sys.stdout.write(dumps(obj, indent=2, default=str) + "\n")
    sys.stdout.flush()


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats to `digits` significant digits, None as a dash."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


_PROV_STYLE = {"measured": "green", "estimated": "yellow", "fallback": "red"}


def prov(label: str) -> str:
    """A provenance label coloured as everywhere (measured green, estimated yellow, fallback red)."""
    return f"[{_PROV_STYLE.get(label, 'white')}]{label}[/]" if label else ""


WEATHER_HELP = ("CSV of weather-forecast columns (timestamp + weather_*; e.g. from `greenstack carbon weather`) "
                "for the forecaster; applies to every --trace; repeatable")


def add_trace_arguments(p: argparse.ArgumentParser, purpose: str) -> None:
    """`--trace` (what the command `purpose`s) and `--history` (seen by the forecaster only), as files
    or shipped zone-years; shared by forecast-eval and backtest."""
    p.add_argument("--trace", action="append", required=True, metavar="FILE|ZONE:YEAR",
                   help=f"CSV to {purpose} (Electricity Maps export or timestamp,carbon_intensity), or a "
                        "shipped zone-year such as GB:2023; repeatable")
    p.add_argument("--history", action="append", default=[], metavar="FILE|ZONE:YEARS",
                   help="earlier data of the same zone, seen by the forecaster only (a CSV or e.g. "
                        "GB:2021-2022); repeatable")


def add_weather_argument(p: argparse.ArgumentParser) -> None:
    """`--weather FILE` for subcommands that run the forecaster (forecast-eval, backtest)."""
    p.add_argument("--weather", action="append", default=[], metavar="FILE", help=WEATHER_HELP)


def progress(enabled: bool) -> Any:
    """A transient stderr progress bar per trace (disabled for --json output)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("forecast-eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), transient=True, disable=not enabled)
