"""Where greenstack's packaged configs and recipes live.

In a wheel they are `greenstack/conf` and `greenstack/recipes`; in a source checkout they stay at the
repository top level (`conf/`, `recipes/`). Users add recipe directories with the
`GREENSTACK_RECIPE_PATH` environment variable (os.pathsep-separated) or Hydra's `hydra.searchpath`.
"""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent
RECIPE_PATH_ENV = "GREENSTACK_RECIPE_PATH"


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
