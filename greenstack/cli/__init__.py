"""`greenstack` command line: one module per subcommand under `greenstack.cli`, dispatched by `main`.

Errors the user can fix are printed as one clear message (every problem listed) and exit non-zero
without a traceback; `--debug` (or GREENSTACK_DEBUG=1) shows the traceback. Subcommand modules are
imported only when their command runs, so `greenstack --help` stays fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

from greenstack.cli._common import report_error
from greenstack.errors import GreenstackError

USAGE = """usage: greenstack <command> [args]

commands:
  train [overrides]        train (Hydra app: recipe=NAME, key=value, -m for multirun, --cfg job);
                           -m ... launcher=slurm submits the jobs to Slurm; a job table follows every multirun
  validate [overrides]     compose and check a config; lists every problem, exit 2 if any
  data prepare [overrides] tokenise a data set into the cache training reuses, as a measured, schedulable job
  ls [GROUP] [overrides]   config groups, options and recipes, with where each came from
                           (hydra.searchpath=[...] adds config sources, as for train)
  cp GROUP/OPTION DEST     copy a recipe or config option to edit (e.g. cp recipe/quickstart recipes-mine/)
  doctor                   which energy meters and carbon sources work on this machine
  plan forecast-eval ...   rolling-origin evaluation of the carbon-intensity forecaster
  plan backtest ...        backtest carbon-aware start times against the oracle on a trace
  plan region ...          where and when a CPU job should run (carbon x price)
  plan start ... --exec -- CMD   wait for the lowest-carbon window before a deadline, then exec CMD
  carbon check ...         validate a carbon-intensity CSV and flag spikes
  carbon keygen|sign|verify  sign or verify a carbon-intensity data file (Ed25519)
  carbon weather ...       weather-forecast columns (Open-Meteo, no look-ahead) for the forecaster
  model keygen|sign|verify signed model artifacts with an ownership fingerprint
  predict RUN_DIR --text T classify texts with a text run's saved model (class names, not indices)
  federated keygen ...     per-run TLS certificates for federated=geo federated.transport=tls
  report tco|compare|html  cost of a run (vs a measured baseline), multirun Pareto table/plot, report.html
  pool create|request|settle|status|budget|log   shared carbon budget pool (SQLite file or PostgreSQL URL)
  audit verify|show PATH   check a hash-chained decision log (names the first tampered line)

`greenstack <command> --help` describes a command's arguments.
global flag: --debug shows tracebacks.  Docs: README.md
"""


def _model(argv: list[str]) -> int:
    from greenstack.cli.model import run_model

    return run_model(argv)


def _predict(argv: list[str]) -> int:
    from greenstack.cli.predict import predict

    return predict(argv)


def _train(argv: list[str]) -> int:
    from greenstack.cli.train import train

    return train(argv)


def _validate(argv: list[str]) -> int:
    from greenstack.cli.configs import validate

    return validate(argv)


def _ls(argv: list[str]) -> int:
    from greenstack.cli.configs import ls

    return ls(argv)


def _cp(argv: list[str]) -> int:
    from greenstack.cli.configs import cp

    return cp(argv)


def _doctor(argv: list[str]) -> int:
    from greenstack.cli.doctor import run_doctor

    return run_doctor(argv)


def _plan(argv: list[str]) -> int:
    from greenstack.cli.plan import run_plan

    return run_plan(argv)


def _carbon(argv: list[str]) -> int:
    from greenstack.cli.carbon import run_carbon

    return run_carbon(argv)


def _data(argv: list[str]) -> int:
    from greenstack.cli.data import run_data

    return run_data(argv)


def _report(argv: list[str]) -> int:
    from greenstack.cli.report import run_report

    return run_report(argv)


def _pool(argv: list[str]) -> int:
    from greenstack.cli.pool import run_pool

    return run_pool(argv)


def _audit(argv: list[str]) -> int:
    from greenstack.cli.audit import run_audit

    return run_audit(argv)


def _federated(argv: list[str]) -> int:
    from greenstack.cli.federated import run_federated

    return run_federated(argv)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "model": _model, "predict": _predict, "train": _train, "validate": _validate, "ls": _ls, "cp": _cp,
    "doctor": _doctor, "plan": _plan, "carbon": _carbon, "report": _report, "pool": _pool, "audit": _audit,
    "federated": _federated, "data": _data}


def main(argv: Sequence[str] | None = None) -> int:
    """The `greenstack` console script: run one subcommand, return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" not in argv or os.environ.get("GREENSTACK_DEBUG") == "1":
        return _main(argv)
    os.environ["GREENSTACK_DEBUG"] = "1"  # worker processes (federated spawn, Slurm jobs) inherit it
    try:
        return _main(argv)
    finally:
        del os.environ["GREENSTACK_DEBUG"]


def _main(argv: list[str]) -> int:
    debug = "--debug" in argv or os.environ.get("GREENSTACK_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        print(f"greenstack: unknown command {command!r}" + (f"; did you mean {close[0]!r}?" if close else ""),
              file=sys.stderr)
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest)
    except GreenstackError as e:
        if debug:
            raise
        return report_error(e)
    except KeyboardInterrupt as e:  # Ctrl-C (130), or SIGTERM during a run (RunInterrupted, 143)
        if not getattr(e, "reported", False):  # a run says so itself, with where its partial figures went
            print(f"greenstack: {str(e) or 'interrupted'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # output piped into `head` and closed early
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
