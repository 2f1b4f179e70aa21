"""Compose greenstack configs outside a Hydra job (validate, ls, pre-flight of `train`).

Hydra stops at the first bad override; here each failing override is recorded and dropped and
composition retried, so a user sees every mistake in one go.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig

from greenstack.errors import Problem
from greenstack.paths import conf_dir, searchpath_recipes

CONFIG_NAME = "train"


@contextmanager
def hydra_context(overrides: Sequence[str] = ()) -> Iterator[GlobalHydra]:
    """A fresh, initialised global Hydra for the packaged config tree; the `recipe/` dirs of a
    `hydra.searchpath=[...]` among `overrides` shadow the packaged recipes (as in `greenstack train`)."""
    GlobalHydra.instance().clear()
    try:
        with searchpath_recipes(searchpath_dirs(overrides)), \
                initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="greenstack"):
            yield GlobalHydra.instance()
    finally:
        GlobalHydra.instance().clear()


def group_options(group: str) -> list[str]:
    loader = GlobalHydra.instance().config_loader()
    return sorted(loader.get_group_options(group))


def _check_group_overrides(overrides: Sequence[str]) -> tuple[list[str], list[Problem]]:
    """Drop overrides that select a non-existent option of a known group, with a problem for each."""
    parser = OverridesParser.create()
    kept, problems = [], []
    loader = GlobalHydra.instance().config_loader()
    extra_dirs = searchpath_dirs(overrides)
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException as e:
            problems.append(Problem(text, text, f"cannot parse override: {str(e).splitlines()[0]}",
                                    "use key=value, +key=value, ~key or group=option"))
            continue
        group = override.key_or_group
        options = loader.get_group_options(group) if "." not in group and not group.startswith("hydra") else []
        options = sorted(set(options) | {p.stem for d in extra_dirs for p in (d / group).glob("*.yaml")}) \
            if options else options
        if options and not override.is_delete() and override.package is None:
            values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [
                override.value()]
            bad = [v for v in values if isinstance(v, str) and v not in options]
            if bad:
                for v in bad:
                    close = difflib.get_close_matches(v, options, n=3)
                    hint = f"did you mean {', '.join(close)}? " if close else ""
                    problems.append(Problem(group, v, f"unknown option of group '{group}'",
                                            f"{hint}valid options: {', '.join(sorted(options))}"))
                continue
        kept.append(text)
    return kept, problems


def searchpath_entries(overrides: Sequence[str]) -> list[str]:
    """The entries of a `hydra.searchpath=[...]` override, as written (`file://DIR`, `pkg://mod`, DIR)."""
    parser = OverridesParser.create()
    entries: list[str] = []
    for text in overrides:
        if not text.lstrip("+").startswith("hydra.searchpath="):
            continue
        try:
            value = parser.parse_override(text).value()
        except HydraException:
            continue
        entries += [str(e) for e in (value if isinstance(value, list) else [value])]
    return entries


def searchpath_dirs(overrides: Sequence[str]) -> list[Path]:
    """Directories added by a `hydra.searchpath=[...]` override (file:// or plain paths)."""
    return [Path(e.removeprefix("file://")) for e in searchpath_entries(overrides)
            if e.startswith("file://") or "://" not in e]


def _yaml_problem(error: yaml.YAMLError) -> Problem:
    """A YAML syntax error as one problem: the file and line, what is wrong there, and (tabs) the fix."""
    mark = getattr(error, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else "<yaml>"
    what = getattr(error, "problem", None) or str(error).splitlines()[0]
    fix = "indent with spaces, not tabs" if "\\t" in str(what) or "\t" in str(what) else "fix the YAML syntax there"
    return Problem(where, "", f"not valid YAML: {what}", fix)


def compose_with_problems(overrides: Sequence[str], *, return_hydra_config: bool = False
                          ) -> tuple[DictConfig | None, list[Problem]]:
    """Compose `train` with `overrides`; collect every override problem instead of stopping at one."""
    with hydra_context(overrides):
        kept, problems = _check_group_overrides(overrides)
        for _ in range(len(kept) + 1):
            try:
                cfg = compose(config_name=CONFIG_NAME, overrides=kept, return_hydra_config=return_hydra_config)
                return cfg, problems
            except yaml.YAMLError as e:  # a recipe or config file that is not YAML: say which file and line
                problems.append(_yaml_problem(e))
                return None, problems
            except HydraException as e:
                message = str(e).splitlines()[0]
                culprit = next((o for o in kept if o.split("=")[0].lstrip("+~") in message), None)
                if culprit is None:
                    problems.append(Problem("<compose>", "", message))
                    return None, problems
                problems.append(Problem(culprit.split("=")[0].lstrip("+~"), culprit.partition("=")[2],
                                        message, "check the key's spelling; add a new key with +key=value"))
                kept = [o for o in kept if o != culprit]
    return None, problems


def expand_sweep(overrides: Sequence[str]) -> list[list[str]]:
    """Every job's overrides of a basic multirun (`a=1,2 b=x,y` -> 4 lists); others pass through once."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parser = OverridesParser.create()
    parsed = parser.parse_overrides([o for o in overrides if not o.startswith("hydra.")])
    try:
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # noqa: BLE001 - non-basic sweeps (ranges, intervals) are validated in-job
        return [list(overrides)]
    return [list(job) for batch in batches for job in batch] or [list(overrides)]
