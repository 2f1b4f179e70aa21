"""Registers `hydra/launcher=greenstack_slurm` (what `launcher=slurm` selects); see greenstack.launch.slurm.

Optional: without hydra-submitit-launcher installed (`pip install 'greenstack[slurm]'`) nothing is
registered and `launcher=slurm` fails to compose with Hydra's "could not find" message.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

try:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
except ImportError:  # the slurm extra is not installed
    SlurmQueueConf = None  # type: ignore[assignment,misc]

if SlurmQueueConf is not None:

    @dataclass
    class GreenstackSlurmConf(SlurmQueueConf):  # type: ignore[misc,valid-type]
        """submitit_slurm's options plus `plan_begin` (carbon-aware --begin at submit time)."""

        _target_: str = "hydra_plugins.greenstack_launcher.slurm_launcher.GreenstackSlurmLauncher"
        plan_begin: bool = True

    ConfigStore.instance().store(group="hydra/launcher", name="greenstack_slurm", node=GreenstackSlurmConf(),
                                 provider="greenstack")
