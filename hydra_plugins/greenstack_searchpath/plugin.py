"""Hydra plugins that expose flat recipe directories as the `recipe` config group.

Recipes live in `recipes/*.yaml` (a flat directory users can copy, share and version), but Hydra
selects group options from `<search dir>/recipe/*.yaml`. `RecipeDirConfigSource` (scheme
`recipes://`) maps one onto the other, and `GreenstackSearchPathPlugin` registers the packaged recipe
directory plus every directory in GREENSTACK_RECIPE_PATH and the `recipe/` dir of every
`hydra.searchpath` repo of the command (user recipes first, so they shadow ours: Hydra itself appends
searchpath entries after ours, where a packaged recipe of the same name would silently win).
"""

from __future__ import annotations

import os

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.object_type import ObjectType
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

GROUP = "recipe"


class RecipeDirConfigSource(ConfigSource):
    """A directory of recipe YAML files presented as the `recipe` group."""

    @staticmethod
    def scheme() -> str:
        return "recipes"

    def _strip(self, config_path: str) -> str | None:
        config_path = config_path.strip("/")
        if config_path == GROUP:
            return ""
        if config_path.startswith(GROUP + "/"):
            return config_path[len(GROUP) + 1 :]
        return None

    def load_config(self, config_path: str) -> ConfigResult:
        rel = self._strip(self._normalize_file_name(config_path))
        full_path = os.path.join(self.path, rel) if rel else ""
        if not rel or not os.path.isfile(full_path):
            raise ConfigLoadError(f"Config not found : {full_path or config_path}")
        with open(full_path, encoding="utf-8") as f:
            header = ConfigSource._get_header_dict(f.read(512))
            f.seek(0)
            cfg = OmegaConf.load(f)
        return ConfigResult(config=cfg, path=f"{self.scheme()}://{self.path}", provider=self.provider,
                            header=header)

    def available(self) -> bool:
        return os.path.isdir(self.path)

    def is_group(self, config_path: str) -> bool:
        if config_path.strip("/") == "":
            return self.available()
        rel = self._strip(config_path)
        return rel == "" and self.available()

    def is_config(self, config_path: str) -> bool:
        rel = self._strip(self._normalize_file_name(config_path))
        return bool(rel) and os.path.isfile(os.path.join(self.path, rel))

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if not self.available():
            return []
        if config_path.strip("/") == "":
            return [GROUP] if results_filter in (None, ObjectType.GROUP) else []
        if self._strip(config_path) != "":
            return []
        files: list[str] = []
        for name in os.listdir(self.path):
            if name.endswith((".yaml", ".yml")) and os.path.isfile(os.path.join(self.path, name)):
                self._list_add_result(files=files, file_path=f"{GROUP}/{name}", file_name=name,
                                      results_filter=results_filter)
        return sorted(set(files))


class GreenstackSearchPathPlugin(SearchPathPlugin):
    """Adds greenstack's recipe directories to the search path of greenstack's own app only."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        from greenstack.paths import conf_dir, recipes_dir, searchpath_recipe_dirs, user_recipe_dirs

        ours = str(conf_dir())
        if not any(ours in (element.path or "") for element in search_path.get_path()):
            return
        for i, directory in enumerate(user_recipe_dirs()):
            search_path.append(provider=f"GREENSTACK_RECIPE_PATH[{i}]", path=f"recipes://{directory}")
        for directory in searchpath_recipe_dirs():
            search_path.append(provider="hydra.searchpath", path=f"recipes://{directory}")
        search_path.append(provider="greenstack-recipes", path=f"recipes://{recipes_dir()}")
