"""Registers `hydra/sweeper=greenstack_carbon`: the carbon-budgeted multi-objective sweep
(see greenstack.launch.carbon_sweep; needs optuna, `pip install 'greenstack[sweep]'`)."""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class GreenstackCarbonSweeperConf:
    """Search `params` for accuracy vs measured kgCO2e within a carbon budget."""

    _target_: str = "hydra_plugins.greenstack_sweeper.carbon_sweeper.GreenstackCarbonSweeper"
    n_trials: int = 20
    batch_size: int = 1             # trials launched together (e.g. one Slurm array per batch)
    total_budget_kg: float = 0.01   # the sweep stops once stop_fraction of this is spent (measured)
    trial_budget_kg: Optional[float] = None  # noqa: UP045 - OmegaConf structured config; a trial emitting more is rejected or penalised
    stop_fraction: float = 0.9
    over_budget: str = "reject"     # reject | penalize
    penalty: float = 0.5            # penalize: accuracy - penalty x (kg / trial_budget_kg - 1)
    metric: str = "test/accuracy"   # maximised; kgCO2e is minimised
    sampler: str = "nsga2"          # nsga2 | tpe | random (optuna, in-memory)
    seed: int = 0
    params: Any = field(default_factory=dict)  # key: choice(...) | range(...) | interval(...) | tag(log, interval(...))


ConfigStore.instance().store(group="hydra/sweeper", name="greenstack_carbon", node=GreenstackCarbonSweeperConf,
                             provider="greenstack")
