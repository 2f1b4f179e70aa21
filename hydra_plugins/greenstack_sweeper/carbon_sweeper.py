"""Hydra Sweeper plugin around greenstack.launch.carbon_sweep.run_search (all logic lives there)."""

from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict


class GreenstackCarbonSweeper(Sweeper):
    """`hydra/sweeper=greenstack_carbon` (see recipes/carbon_nas.yaml)."""

    def __init__(self, **settings: Any) -> None:
        from greenstack.launch.carbon_sweep import SweepSettings

        params = settings.pop("params", None) or {}
        if OmegaConf.is_config(params):
            params = OmegaConf.to_container(params, resolve=True)
        self.settings = SweepSettings(params=dict(params), **settings)
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        from greenstack.launch.carbon_sweep import run_search

        assert self.config is not None
        # command-line sweep dimensions (key=choice(...)/interval(...)) join the search space
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader if self.hydra_context else None)
        fixed = []
        for override, text in zip(parser.parse_overrides(arguments), arguments, strict=True):
            if override.is_sweep_override():
                self.settings.params[override.get_key_element()] = text.split("=", 1)[1]
            else:
                fixed.append(text)
        with open_dict(self.config.hydra.sweep):
            self.config.hydra.sweep.dir = str(self.config.hydra.sweep.dir)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")

        def run_dir_of(num: int) -> str:
            return str(sweep_dir / str(num))

        return run_search(self.settings, fixed, lambda batch, first: self.launcher.launch(batch, initial_job_idx=first),
                          sweep_dir=sweep_dir, run_dir_of=run_dir_of)
