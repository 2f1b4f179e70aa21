"""`GreenstackCallback` for Lightning (install with `pip install 'greenstack[lightning]'`).

Through Lightning's own mechanisms:

* the scheduler's start decision in `on_fit_start` (waits for the window before the first batch, with
  the runner's start-now routes: SIGUSR2, GREENSTACK_START_NOW=1, `touch RUN_DIR/START_NOW`);
* step-aligned figures (`energy/total_kwh`, `carbon/total_kg_co2e`, `energy/j_per_sample`, and
  `energy/j_per_token` for batches with `input_ids`) sent to every logger in `trainer.loggers` on the
  trainer's logging steps (`log_every_n_steps`), at `trainer.global_step`;
* the carbon budget stops training with `trainer.should_stop` (reason in the summary);
* at the end (also after an exception), the run dir (`sustainability.json`, `emissions.csv`,
  `audit.jsonl`, `report.html`) and the summary's figures (`greenstack/...`) sent to `trainer.loggers`.

Works with the `lightning` package and with `pytorch_lightning` (whichever is installed, `lightning`
first); importing greenstack itself never imports either.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from greenstack.integrations import CallbackConfig, missing, summary_metrics

try:
    from lightning.pytorch import Callback
except ImportError:
    try:
        from pytorch_lightning import Callback  # type: ignore[no-redef]
    except ImportError as _err:  # pragma: no cover - exercised only without Lightning
        raise missing("Lightning (the `lightning` or `pytorch-lightning` package)", "lightning", _err) from None

__all__ = ["GreenstackCallback", "batch_size_and_tokens"]


def batch_size_and_tokens(batch: Any) -> tuple[int, int]:
    """(samples, tokens) of a batch: the leading dimension of its first tensor; tokens from `input_ids`."""
    import torch

    if isinstance(batch, torch.Tensor):
        return (int(batch.shape[0]) if batch.dim() else 1), 0
    if isinstance(batch, Mapping):
        ids = batch.get("input_ids")
        tokens = int(ids.numel()) if isinstance(ids, torch.Tensor) else 0
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.dim():
                return int(value.shape[0]), tokens
        return 0, tokens
    if isinstance(batch, (list, tuple)):
        for value in batch:
            samples, tokens = batch_size_and_tokens(value)
            if samples:
                return samples, tokens
    return 0, 0


class GreenstackCallback(Callback):
    """Meter, schedule, budget and report a Lightning `Trainer.fit` the way greenstack runs are.

    `run_dir` defaults to `<trainer.default_root_dir>/greenstack`; `config`, `carbon`, `energy`,
    `scheduler` and `overrides` are those of `greenstack.track` (validated here, before training).
    """

    def __init__(self, run_dir: str | Path | None = None, *, config: str | Path | None = None,
                 carbon: str | Mapping[str, Any] | None = None, energy: str | Mapping[str, Any] | None = None,
                 scheduler: str | Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
                 run_name: str | None = None, meters: list[Any] | None = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> None:
        super().__init__()
        self.options = CallbackConfig(run_dir, config=config, carbon=carbon, energy=energy, scheduler=scheduler,
                                      overrides=overrides, run_name=run_name, meters=meters, clock=clock, sleep=sleep)
        self.run: Any = None
        self.summary: dict[str, Any] | None = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        total = trainer.estimated_stepping_batches
        self.summary = None
        self.run = self.options.open(Path(trainer.default_root_dir) / "greenstack", model=pl_module,
                                     total_steps=int(total) if total != float("inf") else 0,
                                     log_every=int(trainer.log_every_n_steps or 1), rank=int(trainer.global_rank))
        self.run.decide_start()  # waits for the low-carbon window when the scheduler says so
        self.run.start()

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.run is not None and self.run.timer._t is None:
            self.run.timer.begin()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        run = self.run
        if run is None:
            return
        samples, tokens = batch_size_and_tokens(batch)
        delta = int(trainer.global_step) - run.state.step
        if delta > 0:
            run.timer.end()
        stop = run.step(samples=samples, tokens=tokens, steps=delta)
        if delta > 0 and run.last_figures_step == run.state.step and trainer.is_global_zero:
            # straight to the loggers: pl_module.log would make Lightning re-reduce these keys every step
            values = {key: float(value) for key, value in run.last_figures.items()}
            for logger in trainer.loggers:
                logger.log_metrics(values, step=int(trainer.global_step))
        if stop or run.state.stop:
            trainer.should_stop = True

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._finish(trainer)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        self._finish(trainer, exception)

    def _finish(self, trainer: Any, error: BaseException | None = None) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        self.summary = run.finish(error=error)
        if error is None and trainer.is_global_zero:
            values = summary_metrics(self.summary)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=int(trainer.global_step))
                logger.save()
