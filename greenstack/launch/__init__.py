"""Sweeps beyond one process: the Slurm launcher's greenstack side, the multirun job table and the
carbon-budgeted sweep.

Why a package of its own: the Hydra plugins in `hydra_plugins/` must import fast and stay thin
(Hydra imports every plugin on start-up); the logic they call lives here and is tested directly.
"""
