"""`greenstack` command line: train (a Hydra app), validate, ls, cp, doctor.

Errors the user can fix are printed as one clear message (every problem listed) and exit non-zero
without a traceback; `--debug` (or GREENSTACK_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from greenstack.console import plural
from greenstack.errors import ConfigError, GreenstackError, Problem

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

# Hydra flags that take a value (pre-flight validation is skipped when config sources are changed)
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}
_failure: dict[str, Any] = {}


def _console(stderr: bool = True) -> Any:
    from greenstack.console import make_console

    return make_console(stderr=stderr)


def print_problems(problems: Sequence[Problem], title: str) -> None:
    """One problem: one line naming the key; several: a table of them all."""
    from rich.table import Table

    if len(problems) == 1:
        import re

        head = re.sub(r"\s*\(\d+ problems?\)|:? \d+ problems?", "", title)  # the title without its count
        _console().print(f"[bold red]{head}:[/] {problems[0].format()}", markup=True, soft_wrap=True,
                         highlight=False)
        return

    table = Table(title=title, title_justify="left", show_lines=False, expand=False)
    for col in ("key", "value", "problem", "how to fix"):
        table.add_column(col, overflow="fold")
    for p in problems:
        table.add_row(p.key, "" if p.value is None else str(p.value), p.reason, p.fix)
    _console().print(table)


def report_error(error: BaseException) -> int:
    if isinstance(error, ConfigError) and len(error.problems) > 1:
        print_problems(error.problems, f"greenstack: {plural(len(error.problems), 'problem')}")
    else:
        _console().print(f"[bold red]greenstack error:[/] {error}", markup=True, soft_wrap=True)
    return getattr(error, "exit_code", 1)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        ident = (p.key, str(p.value), p.reason)
        if ident not in seen:
            seen.add(ident)
            out.append(p)
    return out


def collect_problems(overrides: Sequence[str], *, multirun: bool = False) -> list[Problem]:
    """Every problem with the config(s) these overrides describe (each job of a basic multirun)."""
    problems: list[Problem] = recipe_path_problems()
    if problems:  # recipes would come from elsewhere: composing further would only add noise
        return problems
    from greenstack.compose import compose_with_problems, expand_sweep
    from greenstack.validate import validate_config

    for job in expand_sweep(overrides) if multirun else [list(overrides)]:
        cfg, found = compose_with_problems(job, return_hydra_config=True)  # the launcher decides some checks
        problems += found
        if cfg is not None:
            problems += validate_config(cfg)
    return _dedupe(problems)


def recipe_path_problems() -> list[Problem]:
    """A GREENSTACK_RECIPE_PATH entry that is missing or a file (else recipes would silently come from elsewhere)."""
    from greenstack.paths import RECIPE_PATH_ENV
    from greenstack.paths import recipe_path_problems as bad_entries

    return [Problem(RECIPE_PATH_ENV, entry, reason,
                    "point it at a directory of recipe YAML files (create one with "
                    "`greenstack cp recipe/quickstart DIR/`), or unset it")
            for entry, reason in bad_entries()]


def _check_recipe_path() -> None:
    problems = recipe_path_problems()
    if problems:
        raise ConfigError(problems)


# -- train ---------------------------------------------------------------------------------------
#: what greenstack's job-failure exception says; `_HydraNoise` drops it (greenstack already reported)
_JOB_FAILED = "greenstack: job failed (reported above)"


def _task(cfg: Any) -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import CompactHydraException

    from greenstack import runner

    class JobFailed(CompactHydraException):
        pass

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    _scrub_secrets(hydra_cfg, run_dir)
    try:
        summary = runner.run(cfg, run_dir)
    except Exception as raised:
        e = _unwrap(raised)
        error = f"{type(e).__name__}: {e}"
        log_file = _log_failure(hydra_cfg, run_dir, e)
        _record_job(hydra_cfg, run_dir, "FAILED", error=error)
        if _failure.get("debug"):
            raise
        if isinstance(e, GreenstackError):
            _failure["code"] = report_error(e)
        else:  # a bug or a library's error: the cause on screen, the traceback in the job's log
            first = (str(e).strip().splitlines() or [""])[0]
            _console().print(f"[bold red]greenstack error:[/] run failed: {type(e).__name__}: {first}\n"
                             f"  traceback in {log_file} (rerun with --debug to see it here)",
                             markup=True, soft_wrap=True, highlight=False)
            _failure["code"] = 1
        raise JobFailed(_JOB_FAILED) from None
    _record_job(hydra_cfg, run_dir, "COMPLETED", summary=summary)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun/Slurm every rank returns; rank 0 reports
        _print_run_summary(summary, run_dir)
    return summary


def _unwrap(error: Exception) -> Exception:
    """The error itself, not Hydra's `InstantiationException` around it (a data builder's ConfigError
    raised inside `instantiate` is still the user's error, with its own clear message)."""
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and isinstance(error.__cause__, Exception):
        error = error.__cause__
    return error


def _scrub_secrets(hydra_cfg: Any, run_dir: str) -> None:
    """Secrets written literally in a YAML config: *** in the run's .hydra files and the sweep's multirun.yaml."""
    from hydra.types import RunMode

    from greenstack.secrets import scrub_hydra_dir

    if hydra_cfg.output_subdir is None:
        return
    extra = (Path(hydra_cfg.sweep.dir) / "multirun.yaml",) if hydra_cfg.mode == RunMode.MULTIRUN else ()
    scrub_hydra_dir(Path(run_dir) / hydra_cfg.output_subdir, extra)


def _log_failure(hydra_cfg: Any, run_dir: str, error: BaseException) -> Path:
    """Write the error (with its traceback unless it is a user error) into the job's own log file, and
    only there: the terminal gets one short message, the log the full story."""
    import logging
    import traceback

    log_file = Path(run_dir) / f"{hydra_cfg.job.name}.log"
    user_error = isinstance(error, GreenstackError)
    text = f"run failed: {type(error).__name__}: {error}"
    if not user_error:
        text += "\n" + "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip()
    record = logging.getLogger("greenstack").makeRecord("greenstack", logging.ERROR, __file__, 0, text, None, None)
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.FileHandler) and Path(h.baseFilename) == log_file.resolve()]
    for handler in handlers:
        handler.handle(record)
    if not handlers:  # logging configured elsewhere (hydra/job_logging=none): append it ourselves
        try:
            log_file.parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "a", encoding="utf-8") as f:
                f.write(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s").format(record) + "\n")
        except OSError:
            pass
    return log_file


class _HydraNoise:
    """stderr without Hydra's epilogue to a failed job ("Error executing job with overrides: ...",
    the re-raised failure, "Set the environment variable HYDRA_FULL_ERROR=1 ..."): greenstack has
    already said what failed and where its log is. Everything else passes through unchanged."""

    _DROP = ("Error executing job with overrides:", _JOB_FAILED)

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        stripped = text.strip()
        if stripped.startswith(self._DROP) or "HYDRA_FULL_ERROR=1" in stripped:
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _record_job(hydra_cfg: Any, run_dir: str, state: str, *, summary: dict[str, Any] | None = None,
                error: str | None = None) -> None:
    """One row of the job table printed after a multirun run in this process (the basic launcher)."""
    from hydra.types import RunMode

    from greenstack.launch import jobs as jobtable

    if hydra_cfg.mode != RunMode.MULTIRUN:
        return
    metric, kg = jobtable.figures_from_summary(summary)
    log_file = Path(run_dir) / f"{hydra_cfg.job.name}.log"
    jobtable.record(jobtable.JobOutcome(num=int(hydra_cfg.job.num), overrides=list(hydra_cfg.overrides.task),
                                        state=state, run_dir=run_dir, log_path=str(log_file), metric=metric,
                                        emissions_kg=kg, error=error))


def _print_run_summary(summary: dict[str, Any], run_dir: str) -> None:
    from rich.table import Table

    table = Table(title=f"run {summary['run_id']}: {run_dir}", title_justify="left",
                  caption="sources of every figure: sustainability.json", caption_justify="left")
    for col in ("figure", "value", "provenance"):
        table.add_column(col, overflow="fold")
    colours = {"measured": "green", "estimated": "yellow", "fallback": "red"}
    for key, fig in summary["metrics"].items():
        table.add_row(key, summary_cell(fig["value"], fig["unit"]),
                      f"[{colours[fig['provenance']]}]{fig['provenance']}[/]")
    _console(stderr=False).print(table)


def summary_cell(value: Any, unit: str) -> str:
    """One short table cell: numbers with their unit, "n/a" for figures this machine cannot give,
    a count for lists and mappings (decision logs belong in sustainability.json, not on screen)."""
    if value is None:
        return "n/a"
    if unit == "json" and isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            return value
    if isinstance(value, (list, tuple)):
        return f"{len(value)} entr{'y' if len(value) == 1 else 'ies'} (sustainability.json)"
    if isinstance(value, dict):
        return f"{len(value)} keys (sustainability.json)"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return f"{text} {unit}".strip()


def train(argv: list[str]) -> int:
    import hydra

    from greenstack.paths import conf_dir

    multirun = any(a in ("-m", "--multirun") for a in argv)
    skip_preflight = any(a.split("=")[0] in _HYDRA_VALUE_FLAGS or a in ("--help", "-h", "--hydra-help")
                         for a in argv)
    if not skip_preflight:
        overrides = [a for a in argv if not a.startswith("-")]
        problems = collect_problems(overrides, multirun=multirun)
        if problems:
            print_problems(problems, f"greenstack: config invalid ({plural(len(problems), 'problem')}); nothing was run")
            return 2
    from greenstack.compose import searchpath_dirs
    from greenstack.launch import jobs as jobtable
    from greenstack.paths import searchpath_recipes
    from greenstack.secrets import hide_override_secrets

    if skip_preflight:
        _check_recipe_path()
    # secret-looking override values move to this process's environment: Hydra saves `${oc.env:...}`
    sys.argv = ["greenstack train", *hide_override_secrets(argv)]
    app = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(_task)
    jobtable.clear()
    code = 0
    stderr = sys.stderr
    if not _failure.get("debug"):
        sys.stderr = _HydraNoise(stderr)
    try:
        with searchpath_recipes(searchpath_dirs([a for a in argv if not a.startswith("-")])):
            app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        code = _failure.get("code", code) if code else 0
    finally:
        sys.stderr = stderr
    outcomes = jobtable.outcomes() if multirun else []
    if outcomes:
        jobtable.print_table(outcomes)
        if any(o.failed for o in outcomes) and code == 0:
            code = 1
    return code


# -- validate / ls / cp ----------------------------------------------------------------------------
VALIDATE_HELP = """usage: greenstack validate [-m] [overrides ...]

Compose the config that `greenstack train` would run with these overrides (recipe=NAME, key=value,
group=option, hydra.searchpath=[...]) and check it: every _target_ against its signature, every value
against its type, model names, data paths, carbon zones. Prints every problem at once.
  -m, --multirun   check every job of a sweep (a=1,2 b=x,y)
Exit 0 valid, 2 with problems.
"""

LS_HELP = """usage: greenstack ls [GROUP] [overrides ...]

List config groups, their options and recipes, with the source each comes from (first source wins;
a shadowed option is marked). Overrides such as 'hydra.searchpath=[file:///path/to/team-repo]' add
the same config sources as for `greenstack train`; GREENSTACK_RECIPE_PATH adds recipe directories.
"""


def _wants_help(argv: Sequence[str]) -> bool:
    return any(a in ("-h", "--help") for a in argv)


def validate(argv: list[str]) -> int:
    if _wants_help(argv):
        print(VALIDATE_HELP)
        return 0
    problems = collect_problems([a for a in argv if a not in ("-m", "--multirun")],
                                multirun="-m" in argv or "--multirun" in argv)
    if problems:
        print_problems(problems, f"greenstack validate: {plural(len(problems), 'problem')}")
        return 2
    _console(stderr=False).print("[green]config is valid[/]")
    return 0


def _sources(overrides: Sequence[str] = ()) -> list[Any]:
    """Config sources in search order, with the `hydra.searchpath` entries of `overrides` (before the schema)."""
    from hydra.core.global_hydra import GlobalHydra

    from greenstack.compose import searchpath_entries

    sources = list(GlobalHydra.instance().config_loader().get_sources())
    entries = searchpath_entries(overrides)
    if entries:
        from hydra._internal.config_repository import ConfigRepository
        from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

        csp = ConfigSearchPathImpl()
        for entry in entries:
            csp.append(provider="hydra.searchpath", path=entry if "://" in entry else f"file://{entry}")
        at = len(sources) - 1 if sources and sources[-1].provider == "schema" else len(sources)
        sources[at:at] = ConfigRepository(csp).get_sources()
    return sources


def _source_file(source: Any, group: str, option: str) -> Path | None:
    scheme, base = type(source).scheme(), source.path.split("://", 1)[-1]
    if scheme == "recipes":
        candidate = Path(base) / f"{option}.yaml"
    elif scheme == "file":
        candidate = Path(base) / group / f"{option}.yaml"
    else:
        return None
    return candidate if candidate.is_file() else None


def ls(argv: list[str]) -> int:
    from hydra.core.object_type import ObjectType
    from rich.table import Table

    from greenstack.compose import hydra_context

    if _wants_help(argv):
        print(LS_HELP)
        return 0
    overrides = [a for a in argv if "=" in a]
    groups = [a for a in argv if "=" not in a]
    if len(groups) > 1 or any(g.startswith("-") for g in groups):
        raise ConfigError("expected at most one GROUP, then overrides (key=value)", key="ls", value=" ".join(groups),
                          fix="e.g. greenstack ls recipe 'hydra.searchpath=[file:///path/to/repo]'")
    only = groups[0] if groups else None
    _check_recipe_path()
    table = Table(title="greenstack config groups (first source wins)", title_justify="left")
    for col in ("group", "option", "source"):
        table.add_column(col, overflow="fold")
    with hydra_context(overrides):
        seen: set[tuple[str, str]] = set()
        files_listed: set[Path] = set()
        rows = []
        for source in _sources(overrides):
            if not source.available():
                continue
            for group in source.list("", ObjectType.GROUP):
                if group == "hydra" or (only and group != only):
                    continue
                for option in source.list(group, ObjectType.CONFIG):
                    file = _source_file(source, group, option)
                    if file is not None and file.resolve() in files_listed:
                        continue  # a searchpath repo's recipe/ dir is also listed as a recipe source
                    if file is not None:
                        files_listed.add(file.resolve())
                    shadowed = (group, option) in seen
                    seen.add((group, option))
                    where = f"{source.provider}: {file or source.path}"
                    rows.append((group, option + (" (shadowed)" if shadowed else ""), where))
    if only and not rows:
        raise ConfigError("no such config group", key="ls", value=only, fix="run `greenstack ls` for all groups")
    for row in sorted(rows, key=lambda r: (r[0] != "recipe", r[0], r[1])):
        table.add_row(*row)
    _console(stderr=False).print(table)
    return 0


def cp(argv: list[str]) -> int:
    """Copy a packaged (or searchpath) option to edit. DEST is a directory when it ends with `/`, exists
    as one, or has no .yaml/.yml suffix (created if missing); otherwise it is the file to write."""
    parser = argparse.ArgumentParser(prog="greenstack cp", description=cp.__doc__)
    parser.add_argument("name", help="GROUP/OPTION, e.g. recipe/quickstart or model/timm")
    parser.add_argument("dest", help="directory (e.g. recipes-mine/, created if missing) or file to copy to")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    from greenstack.compose import hydra_context

    group, _, option = args.name.removesuffix(".yaml").partition("/")
    if not option:
        raise ConfigError("name must be GROUP/OPTION", key="cp", value=args.name, fix="e.g. recipe/quickstart")
    _check_recipe_path()
    with hydra_context():
        found = next((f for s in _sources() if s.available() and (f := _source_file(s, group, option))), None)
        if found is None:
            from greenstack.compose import group_options

            options = group_options(group)
            raise ConfigError(f"no option {option!r} in group {group!r}", key="cp", value=args.name,
                              fix=f"options: {', '.join(options)}" if options else "see `greenstack ls`")
    raw = str(args.dest)
    dest = Path(raw).expanduser()
    as_dir = raw.endswith(("/", os.sep)) or dest.is_dir() or dest.suffix.lower() not in (".yaml", ".yml")
    if as_dir:
        if dest.exists() and not dest.is_dir():
            raise ConfigError("destination is a file, not a directory", key="cp", value=raw,
                              fix=f"remove it, or give a file name ending in .yaml (e.g. {dest}.yaml)")
        dest = dest / found.name
    elif not dest.parent.is_dir():
        raise ConfigError("the destination's directory does not exist", key="cp", value=raw,
                          fix=f"create {dest.parent} first, or give a directory ending in / (created for you)")
    if dest.exists() and not args.force:
        raise ConfigError("destination exists", key="cp", value=str(dest), fix="pass --force to overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(found, dest)
    out = _console(stderr=False)
    out.print(f"copied {found} -> {dest}")
    if group == "recipe":
        out.print(f"run it with: GREENSTACK_RECIPE_PATH={_shell_path(dest.parent)} greenstack train recipe={dest.stem}")
    elif dest.parent.name == group:
        out.print(f"use it with: greenstack train 'hydra.searchpath=[file://{dest.parent.parent.resolve()}]' "
                  f"{group}={dest.stem}")
    else:
        out.print(f"to use it, put it in DIR/{group}/ and add 'hydra.searchpath=[file:///abs/path/to/DIR]'")
    return 0


def _shell_path(path: Path) -> str:
    """A directory as the user may type it: relative to the working directory when inside it."""
    resolved = path.resolve()
    try:
        rel = resolved.relative_to(Path.cwd().resolve())
    except ValueError:
        return str(resolved)
    return str(rel) if str(rel) != "." else "."


def doctor(argv: list[str]) -> int:
    from greenstack.doctor import run_doctor

    return run_doctor(argv)


def plan(argv: list[str]) -> int:
    from greenstack.plan import run_plan

    return run_plan(argv)


def carbon(argv: list[str]) -> int:
    from greenstack.carbon.cli import run_carbon

    return run_carbon(argv)


def model(argv: list[str]) -> int:
    from greenstack.model_sign import run_model

    return run_model(argv)


def predict(argv: list[str]) -> int:
    """Classify texts with a finished text run's model/ (as documented for from_pretrained)."""
    import json

    from greenstack.inference import predict_text

    parser = argparse.ArgumentParser(prog="greenstack predict",
                                     description="classify texts with a text run's saved model and class names")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished text run (holds labels.json and model/)")
    parser.add_argument("--text", action="append", required=True, help="a text to classify (repeat for more)")
    parser.add_argument("--json", action="store_true", help="one JSON object per text instead of a table")
    args = parser.parse_args(argv)
    rows = predict_text(args.run_dir, args.text)
    for row in rows:
        print(json.dumps(row) if args.json else f"{row['label']}\t{row['score']:.3f}\t{row['text']}")
    return 0


def federated(argv: list[str]) -> int:
    from greenstack.federated.cli import run_federated

    return run_federated(argv)


def data(argv: list[str]) -> int:
    from greenstack.prepare import run_data

    return run_data(argv)


def report(argv: list[str]) -> int:
    from greenstack.report_cli import run_report

    return run_report(argv)


def pool(argv: list[str]) -> int:
    from greenstack.report_cli import run_pool

    return run_pool(argv)


def audit(argv: list[str]) -> int:
    from greenstack.report_cli import run_audit

    return run_audit(argv)


COMMANDS = {"model": model, "predict": predict, "train": train, "validate": validate, "ls": ls, "cp": cp, "doctor": doctor, "plan": plan,
            "carbon": carbon, "report": report, "pool": pool, "audit": audit,
            "federated": federated, "data": data}


def main(argv: Sequence[str] | None = None) -> int:
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
    _failure.clear()
    _failure["debug"] = debug
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
