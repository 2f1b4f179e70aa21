"""The Hydra-visible name of greenstack's Slurm launcher (Hydra loads launchers only from hydra_plugins)."""

try:
    from greenstack.launch.slurm import GreenstackSlurmLauncher as _Launcher
except ImportError:  # the slurm extra (hydra-submitit-launcher) is not installed
    _Launcher = None  # type: ignore[assignment,misc]

if _Launcher is not None:

    class GreenstackSlurmLauncher(_Launcher):  # type: ignore[misc,valid-type]
        """See greenstack.launch.slurm.GreenstackSlurmLauncher."""
