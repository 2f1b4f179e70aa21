"""`greenstack validate|ls|cp`: check a composed config, list config groups with their sources, copy
an option to edit. `collect_problems` is also the pre-flight check of `greenstack train`."""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from greenstack.cli._common import console, print_problems, wants_help
from greenstack.console import plural
from greenstack.errors import ConfigError, Problem


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


def check_recipe_path() -> None:
    """Raise ConfigError when GREENSTACK_RECIPE_PATH names a missing directory or a file."""
    problems = recipe_path_problems()
    if problems:
        raise ConfigError(problems)


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


def validate(argv: list[str]) -> int:
    if wants_help(argv):
        print(VALIDATE_HELP)
        return 0
    problems = collect_problems([a for a in argv if a not in ("-m", "--multirun")],
                                multirun="-m" in argv or "--multirun" in argv)
    if problems:
        print_problems(problems, f"greenstack validate: {plural(len(problems), 'problem')}")
        return 2
    console(stderr=False).print("[green]config is valid[/]")
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

    if wants_help(argv):
        print(LS_HELP)
        return 0
    overrides = [a for a in argv if "=" in a]
    groups = [a for a in argv if "=" not in a]
    if len(groups) > 1 or any(g.startswith("-") for g in groups):
        raise ConfigError("expected at most one GROUP, then overrides (key=value)", key="ls", value=" ".join(groups),
                          fix="e.g. greenstack ls recipe 'hydra.searchpath=[file:///path/to/repo]'")
    only = groups[0] if groups else None
    check_recipe_path()
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
    console(stderr=False).print(table)
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
    check_recipe_path()
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
    out = console(stderr=False)
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


