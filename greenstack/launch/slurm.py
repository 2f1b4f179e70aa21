"""greenstack's Slurm launcher: hydra-submitit-launcher's `submitit_slurm` plus three fixes.

1. Carbon-aware submission: with `scheduler=forecast_window` each job is planned at submit time
   and submitted with `--begin` (jobs sharing a start go out as one array).
2. Preemption: Slurm's timeout/preemption signal (submitit's USR2, or USR1 sent by an operator)
   becomes a request that greenstack's checkpointing honours at the next step boundary; once the
   checkpoint is on disk the job is requeued through submitit with `checkpointing.resume=auto`, in
   the same run dir, so it resumes exactly and continues the same W&B run (same run id).
3. Failure visibility: every job's outcome (Slurm state, metric, emissions, log) is recorded for
   the table the CLI prints; a failed job makes the sweep fail instead of passing silently.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra.errors import CompactHydraException
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf, open_dict

from greenstack.errors import GreenstackError
from greenstack.launch import jobs as jobtable
from greenstack.launch import preemption

log = logging.getLogger("greenstack")
#: launcher keys of ours, not passed to submitit
OWN_KEYS = ("plan_begin",)
REQUEUE_SIGNALS = ("SIGUSR1", "SIGUSR2")
BATCH_TRAP = "trap '' USR1 USR2  # greenstack: the training task handles these (checkpoint, requeue)"


class SweepJobFailed(CompactHydraException):
    """A job of the sweep did not complete; the message names its state and log."""


class GreenstackSlurmLauncher(SlurmLauncher):
    """`hydra/launcher=greenstack_slurm` (selected by `launcher=slurm`); see the module docstring."""

    def __init__(self, **params: Any) -> None:
        self.plan_begin = bool(params.pop("plan_begin", True))
        super().__init__(**params)
        # `scancel --signal=USR1 --full` also signals the batch shell and srun, which USR1/USR2 would
        # kill (ending the job before it can checkpoint); the tasks get the signal from slurmd directly
        self.params["setup"] = [BATCH_TRAP, *(self.params.get("setup") or [])]

    # -- submitting side ---------------------------------------------------------------------------
    def _executor(self) -> Any:
        import submitit

        params = dict(self.params)
        init_params = {"folder": params.pop("submitit_folder")}
        if "max_num_timeout" in params:
            init_params[f"{self._EXECUTOR}_max_num_timeout"] = params.pop("max_num_timeout")
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init_params)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in params.items()})
        return executor

    def _job_config(self, overrides: Sequence[str], num: int) -> Any:
        assert self.hydra_context is not None and self.config is not None
        cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(cfg.hydra.job):
            cfg.hydra.job.num = num
        return cfg

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from greenstack.launch.submit import plan_begin

        assert self.config is not None and len(job_overrides) > 0
        # resolve ${now:...} once: a requeued job must find the same sweep dir (and so its checkpoints)
        with open_dict(self.config.hydra.sweep):
            self.config.hydra.sweep.dir = str(self.config.hydra.sweep.dir)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        executor = self._executor()
        base_extra = dict(self.params.get("additional_parameters") or {})
        log.info("Submitit 'slurm' sweep output dir : %s", sweep_dir)

        groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
        run_dirs: list[str] = []
        warned = False
        for offset, overrides in enumerate(job_overrides):
            num = initial_job_idx + offset
            cfg = self._job_config(overrides, num)
            run_dirs.append(str(Path(str(cfg.hydra.sweep.dir)) / str(cfg.hydra.sweep.subdir)))
            node = cfg.get("checkpointing")
            if not warned and not (node and "resume" in node):
                log.warning("launcher=slurm without checkpointing=hierarchical: a preempted or timed-out job "
                            "restarts from step 0 when it is requeued")
                warned = True
            try:
                plan = plan_begin(cfg) if self.plan_begin else None
            except GreenstackError as e:  # a user error (deadline, trace): one message, nothing submitted
                raise SweepJobFailed(f"greenstack: cannot plan the start of job #{num}: {e}") from None
            if plan is not None:
                log.info("job #%d carbon-aware plan: %s", num, plan.describe())
            extra = {**base_extra, **(plan.sbatch_parameters() if plan else {})}
            groups.setdefault(tuple(sorted((k, str(v)) for k, v in extra.items())), []).append(offset)
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))

        submitted: dict[int, Any] = {}
        for extra, offsets in groups.items():
            executor.update_parameters(slurm_additional_parameters=dict(extra))
            args = [(list(job_overrides[i]), "hydra.sweep.dir", initial_job_idx + i,
                     f"job_id_for_{initial_job_idx + i}", Singleton.get_state()) for i in offsets]
            for i, job in zip(offsets, executor.map_array(self, *zip(*args, strict=True)), strict=True):
                submitted[i] = job
                log.info("job #%d submitted as Slurm job %s", initial_job_idx + i, job.job_id)
        return [self._collect(initial_job_idx + i, list(job_overrides[i]), submitted[i], run_dirs[i])
                for i in range(len(job_overrides))]

    def _collect(self, num: int, overrides: list[str], job: Any, run_dir: str) -> JobReturn:
        """Wait for one job; record its outcome; a JobReturn that fails loudly if the job did."""
        ret: JobReturn | None = None
        error = None
        try:
            ret = job.results()[0]
        except Exception as e:  # noqa: BLE001 - submitit's Failed/UncompletedJobError, whatever the cause
            error = str(e)
        if ret is not None and ret.status is JobStatus.COMPLETED:
            state = "COMPLETED"  # the result is back; sacct may still say RUNNING while the step exits
        elif ret is not None:
            state, error = "FAILED", f"{type(ret._return_value).__name__}: {ret._return_value}"
        else:
            state = _slurm_state(job)
            state = "FAILED" if state in ("COMPLETED", "RUNNING", "COMPLETING", "UNKNOWN") else state
        log_path = _log_path(job, failed=state != "COMPLETED")
        metric, kg = jobtable.figures_from_summary(ret._return_value) if ret is not None and not error else (None, None)
        if metric is None and kg is None:
            metric, kg = jobtable.figures_from_run_dir(run_dir)
        jobtable.record(jobtable.JobOutcome(num=num, overrides=filter_overrides(overrides), state=state,
                                            run_dir=run_dir, log_path=log_path, job_id=str(job.job_id),
                                            metric=metric, emissions_kg=kg, error=error))
        if ret is not None and state == "COMPLETED":
            return ret
        failed = JobReturn(overrides=overrides, status=JobStatus.FAILED)
        failed._return_value = SweepJobFailed(f"job #{num} (Slurm job {job.job_id}) {state}; log: {log_path}")
        return failed

    # -- job side ----------------------------------------------------------------------------------
    def __call__(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict[Any, Any]) -> JobReturn:
        import submitit

        channel = preemption.Preemption()  # this job's own: nothing of an earlier job in this process
        if submitit.JobEnvironment().num_tasks > 1:
            # several tasks (nodes x tasks_per_node): torch.distributed's env:// variables, as torchrun sets them
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        usr_signal = submitit.JobEnvironment._usr_sig()
        submitit_handler = signal.getsignal(usr_signal)

        def on_signal(signum: int, frame: Any) -> None:
            if channel.honoured:
                log.warning("received %s: checkpointing at the next step boundary, then requeueing",
                            signal.Signals(signum).name)
                channel.request(signum)
            elif callable(submitit_handler):  # nothing to save: submitit requeues (restart from step 0)
                submitit_handler(signum, frame)

        previous = {s: signal.signal(s, on_signal) for s in {usr_signal, signal.SIGUSR1}}
        try:
            with preemption.offered(channel):  # the run this job starts takes it (runner.run)
                ret = super().__call__(sweep_overrides, job_dir_key, job_num, job_id, singleton_state)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        saved = channel.saved
        if saved is not None and saved["signal"] in REQUEUE_SIGNALS and hasattr(submitit_handler, "__self__"):
            log.warning("checkpoint for %s saved at step %s (%s): requeueing job %s", saved["signal"],
                        saved["step"], saved["where"], job_num)
            # submitit's own path: checkpoint() below -> DelayedSubmission pickled -> scontrol requeue -> exit
            submitit_handler(signal.Signals[saved["signal"]], None)
        return ret

    def checkpoint(self, sweep_overrides: list[str], job_dir_key: str, job_num: int, job_id: str,
                   singleton_state: dict[Any, Any]) -> Any:
        """The requeued job: the same overrides (same run dir, same run id) plus resume=auto."""
        import submitit

        overrides = [o for o in sweep_overrides if not o.startswith("checkpointing.resume=")]
        try:
            cfg = self._job_config(overrides, job_num)
            node = cfg.get("checkpointing")
            if node and "resume" in node:
                overrides.append("checkpointing.resume=auto")
        except Exception as e:  # noqa: BLE001 - requeue anyway; the job restarts from step 0
            log.warning("could not compose the requeued job's config (%s); requeueing unchanged", e)
            overrides = list(sweep_overrides)
        return submitit.helpers.DelayedSubmission(self, overrides, job_dir_key, job_num, job_id, singleton_state)


def _slurm_state(job: Any) -> str:
    """The job's Slurm state from accounting (first word: 'CANCELLED by 0' -> CANCELLED)."""
    try:
        state = str(job.watcher.get_state(job.job_id, mode="force"))
    except Exception:  # noqa: BLE001 - sacct unavailable: say so rather than guess
        return "UNKNOWN"
    return state.split()[0] if state.strip() else "UNKNOWN"


def _log_path(job: Any, *, failed: bool) -> str:
    """The job's submitit log to read: stderr when it failed and wrote any, else stdout."""
    err, out = Path(job.paths.stderr), Path(job.paths.stdout)
    if failed and err.is_file() and err.stat().st_size > 0:
        return str(err)
    return str(out)
