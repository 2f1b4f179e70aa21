"""`greenstack plan start`: wait for the lowest-carbon window before a deadline, then exec a command.

The decision is `greenstack.wait_for_window` (`scheduler=forecast_window`'s policy: one copy of the
rules, the same start-now routes). The command replaces this process (`exec`), so signals, exit code
and stdio are the command's own; it inherits GREENSTACK_START_NOW=1, so a greenstack run it starts
does not wait for a window a second time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from greenstack.errors import ConfigError, Problem

START_HELP = "wait for the lowest-carbon window before a deadline, then exec a command (--exec -- CMD ...)"


def configure_start(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zone", default=None, help="shipped zone to plan on (default: the carbon config's zone)")
    p.add_argument("--trace", default=None, metavar="FILE", help="or your own CSV trace")
    p.add_argument("--duration", default="1h", help="expected run time of the command (e.g. 4h, 90m)")
    p.add_argument("--deadline", default="24h", help="latest finish: a duration from now or an ISO time")
    p.add_argument("--objective", default="mean", help="mean | point | median | a quantile level such as 0.9")
    p.add_argument("--min-saving-pct", type=float, default=0.0, help="wait only for at least this saving")
    p.add_argument("--run-dir", default=".", help="where `touch RUN_DIR/START_NOW` starts at once (default .)")
    p.add_argument("--audit", default=None, metavar="FILE", help="append the decisions to this audit log")
    p.add_argument("--json", action="store_true", help="print the decision as JSON (stderr when --exec)")
    p.add_argument("--exec", dest="exec_", action="store_true", help="then exec the command after --")
    p.add_argument("command", nargs=argparse.REMAINDER, help="the command to exec (after --)")


def run_start_command(args: argparse.Namespace, *, clock: Callable[[], float] | None = None,
                      sleep: Callable[[float], None] | None = None,
                      execvpe: Callable[[str, list[str], dict[str, str]], Any] = os.execvpe) -> int:
    """Wait (clock/sleep injectable for tests), report the decision, then exec the command if asked."""
    from greenstack.policies.scheduler._base import START_NOW_ENV
    from greenstack.tracked import wait_for_window

    command = list(args.command or [])
    if command and command[0] == "--":
        command = command[1:]
    if args.exec_ and not command:
        raise ConfigError(Problem("--exec", None, "no command to run", "e.g. --exec -- python train.py"))
    if command and not args.exec_:
        raise ConfigError(Problem("command", " ".join(command), "a command was given without --exec",
                                  "put --exec before `-- COMMAND ...`"))
    decision = wait_for_window(duration=args.duration, deadline=args.deadline, zone=args.zone, trace=args.trace,
                               objective=args.objective, min_saving_pct=args.min_saving_pct,
                               run_dir=args.run_dir, audit=args.audit, clock=clock, sleep=sleep)
    out = sys.stderr if args.exec_ else sys.stdout
    if args.json:
        print(json.dumps(decision.to_dict(), default=str), file=out, flush=True)
    else:
        saving = f", expected saving {decision.expected_saving_pct:.1f} %" \
            if decision.expected_saving_pct is not None else ""
        print(f"greenstack plan start: {decision.action} at {decision.start.isoformat(timespec='seconds')} "
              f"after waiting {decision.waited_s / 3600:.2f} h{saving}", file=out, flush=True)
    if not args.exec_:
        return 0
    env = {**os.environ, START_NOW_ENV: "1"}
    try:
        execvpe(command[0], command, env)
    except OSError as e:  # exec failed (not found, not executable): this process is still ours
        raise ConfigError(Problem("command", command[0], f"cannot exec: {e.strerror or e}",
                                  "give an executable on PATH (e.g. python)")) from None
    return 0
