"""Where greenstack's packaged configs and recipes live.

In a wheel they are `greenstack/conf` and `greenstack/recipes`; in a source checkout they stay at the
repository top level (`conf/`, `recipes/`). Users add recipe directories with the
`GREENSTACK_RECIPE_PATH` environment variable (os.pathsep-separated) or Hydra's `hydra.searchpath`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

_PKG = Path(__file__).resolve().parent
RECIPE_PATH_ENV = "GREENSTACK_RECIPE_PATH"
# `recipe/` dirs of the `hydra.searchpath` of the command being composed (set by the CLI, read by the
# search-path plugin). Hydra appends searchpath entries after every plugin entry, so without this the
# packaged recipes would silently win over a team repo's recipe of the same name.
_SEARCHPATH_RECIPE_DIRS: ContextVar[tuple[Path, ...]] = ContextVar("greenstack_searchpath_recipes", default=())


def _first_dir(*candidates: Path) -> Path:
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"none of {[str(c) for c in candidates]} exists: is greenstack installed correctly?")


def conf_dir() -> Path:
    """The packaged Hydra config tree."""
    return _first_dir(_PKG / "conf", _PKG.parent / "conf")


def recipes_dir() -> Path:
    """The packaged recipe directory (flat `*.yaml` files, each `# @package _global_`)."""
    return _first_dir(_PKG / "recipes", _PKG.parent / "recipes")


def user_recipe_dirs() -> list[Path]:
    """Recipe directories named in GREENSTACK_RECIPE_PATH, in order (missing ones are kept so we can warn)."""
    raw = os.environ.get(RECIPE_PATH_ENV, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def recipe_path_problems() -> list[tuple[str, str]]:
    """(entry, reason) for each GREENSTACK_RECIPE_PATH entry that is not an existing directory."""
    raw = os.environ.get(RECIPE_PATH_ENV, "")
    out = []
    for entry in (p for p in raw.split(os.pathsep) if p.strip()):
        path = Path(entry).expanduser()
        if not path.exists():
            out.append((entry, "directory does not exist"))
        elif not path.is_dir():
            out.append((entry, "is a file, not a directory of recipes"))
    return out


def searchpath_recipe_dirs() -> list[Path]:
    """`<dir>/recipe` of each `hydra.searchpath` directory of the current command that has one."""
    return list(_SEARCHPATH_RECIPE_DIRS.get())


@contextmanager
def searchpath_recipes(searchpath_dirs: Sequence[Path]) -> Iterator[None]:
    """Let the `recipe/` dirs of these hydra.searchpath directories shadow the packaged recipes while composing."""
    dirs = tuple(d.expanduser().resolve() / "recipe" for d in searchpath_dirs
                 if (d.expanduser() / "recipe").is_dir())
    token = _SEARCHPATH_RECIPE_DIRS.set(dirs)
    try:
        yield
    finally:
        _SEARCHPATH_RECIPE_DIRS.reset(token)
