"""`greenstack train`: the Hydra app around `runner.run`, its pre-flight check, the job table of a
multirun and the one-screen summary of a run.

A failed job prints one short message (its traceback goes to the job's log); `--debug` (or
GREENSTACK_DEBUG=1) shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from greenstack.cli._common import console as _console
from greenstack.cli._common import debug as _debug
from greenstack.cli._common import print_problems, report_error
from greenstack.cli.configs import check_recipe_path, collect_problems
from greenstack.console import plural
from greenstack.errors import GreenstackError

# Hydra flags that take a value (pre-flight validation is skipped when config sources are changed)
_HYDRA_VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                      "--config-dir", "-cd", "--experimental-rerun", "--info", "-i"}


#: what greenstack's job-failure exception says; `_HydraNoise` drops it (greenstack already reported)
_JOB_FAILED = "greenstack: job failed (reported above)"


def _task(cfg: Any, exit_codes: list[int], *, checked: bool = False) -> dict[str, Any]:
    """One job of this invocation; a failed job's exit code goes into `exit_codes` (the invocation's own).

    `checked`: the pre-flight validated this command's config; a single run in this process gets exactly
    that config, so the runner does not check it again (sweeps and remote jobs are checked per job).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import CompactHydraException
    from hydra.types import RunMode

    from greenstack import runner

    class JobFailed(CompactHydraException):
        pass

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    _scrub_secrets(hydra_cfg, run_dir)
    try:
        summary = runner.run(cfg, run_dir, validated=checked and hydra_cfg.mode == RunMode.RUN)
    except Exception as raised:
        e = _unwrap(raised)
        error = f"{type(e).__name__}: {e}"
        log_file = _log_failure(hydra_cfg, run_dir, e)
        _record_job(hydra_cfg, run_dir, "FAILED", error=error)
        if _debug():
            raise
        if isinstance(e, GreenstackError):
            exit_codes.append(report_error(e))
        else:  # a bug or a library's error: the cause on screen, the traceback in the job's log
            first = (str(e).strip().splitlines() or [""])[0]
            _console().print(f"[bold red]greenstack error:[/] run failed: {type(e).__name__}: {first}\n"
                             f"  traceback in {log_file} (rerun with --debug to see it here)",
                             markup=True, soft_wrap=True, highlight=False)
            exit_codes.append(1)
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
        check_recipe_path()
    # secret-looking override values move to this process's environment: Hydra saves `${oc.env:...}`
    sys.argv = ["greenstack train", *hide_override_secrets(argv)]
    exit_codes: list[int] = []  # of this invocation's failed jobs, dropped with it

    def task(cfg: Any) -> dict[str, Any]:
        return _task(cfg, exit_codes, checked=not skip_preflight)

    app = hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")(task)
    code = 0
    stderr = sys.stderr
    if not _debug():
        sys.stderr = _HydraNoise(stderr)
    try:
        with jobtable.collecting() as table, \
                searchpath_recipes(searchpath_dirs([a for a in argv if not a.startswith("-")])):
            app()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        code = (exit_codes[-1] if exit_codes else code) if code else 0
    finally:
        sys.stderr = stderr
    outcomes = table.outcomes() if multirun else []
    if outcomes:
        jobtable.print_table(outcomes)
        if any(o.failed for o in outcomes) and code == 0:
            code = 1
    return code


