"""`GreenstackCallback` for the Hugging Face `Trainer` (install with `pip install 'greenstack[hf]'`).

What it does, through the Trainer's own mechanisms:

* the scheduler's start decision before the first step (`on_train_begin`: waits for the window with
  the runner's start-now routes: SIGUSR2, GREENSTACK_START_NOW=1, `touch RUN_DIR/START_NOW`);
* step-aligned figures (`energy/total_kwh`, `carbon/total_kg_co2e`, `energy/j_per_sample`, and
  `energy/j_per_token` when the Trainer counts tokens) added to every `logs` dict in `on_log`, so
  W&B, MLflow, TensorBoard or whatever `report_to` names receive them. The callback moves itself
  to the front of the Trainer's callback list, so reporting callbacks see the figures;
* the carbon budget stops training with `control.should_training_stop` (reason in the summary);
* at the end, the run dir (`sustainability.json`, `emissions.csv`, `audit.jsonl`, `report.html`)
  and the summary's figures (`greenstack/...`) logged once more through the Trainer's loggers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from greenstack.integrations import CallbackConfig, missing, summary_metrics

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError as _err:  # pragma: no cover - exercised only without transformers
    raise missing("transformers (with accelerate)", "hf", _err) from None

__all__ = ["GreenstackCallback"]


class GreenstackCallback(TrainerCallback):
    """Meter, schedule, budget and report a Hugging Face `Trainer` run the way greenstack runs are.

    `run_dir` defaults to `<output_dir>/greenstack`; `config`, `carbon`, `energy`, `scheduler` and
    `overrides` are those of `greenstack.track` (validated here, before training).
    """

    def __init__(self, run_dir: str | Path | None = None, *, config: str | Path | None = None,
                 carbon: str | Mapping[str, Any] | None = None, energy: str | Mapping[str, Any] | None = None,
                 scheduler: str | Mapping[str, Any] | None = None, overrides: Sequence[str] = (),
                 run_name: str | None = None, meters: list[Any] | None = None,
                 clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None = None) -> None:
        self.options = CallbackConfig(run_dir, config=config, carbon=carbon, energy=energy, scheduler=scheduler,
                                      overrides=overrides, run_name=run_name, meters=meters, clock=clock, sleep=sleep)
        self.run: Any = None
        self.summary: dict[str, Any] | None = None
        self._handler: Any = None
        self._samples_per_step = 0
        self._in_summary_log = False

    # -- start --------------------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._claim_front()
        self.summary = None
        self.run = self.options.open(Path(args.output_dir) / "greenstack", model=model,
                                     total_steps=int(state.max_steps or 0),
                                     log_every=int(args.logging_steps) if args.logging_steps >= 1 else 1,
                                     rank=int(args.process_index))
        self._samples_per_step = int(args.per_device_train_batch_size * args.gradient_accumulation_steps
                                     * max(1, args.world_size))
        self.run.decide_start()  # waits for the low-carbon window when the scheduler says so
        self.run.start()

    def _claim_front(self) -> None:
        """Move this callback ahead of the reporting callbacks, so the figures it adds reach them."""
        frame = inspect.currentframe()
        caller = frame.f_back.f_back if frame is not None and frame.f_back is not None else None
        handler = caller.f_locals.get("self") if caller is not None else None
        if isinstance(handler, CallbackHandler) and self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
            self._handler = handler

    # -- steps --------------------------------------------------------------------------------------
    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is not None:
            self.run.timer.begin()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        run = self.run
        if run is None:
            return
        run.timer.end()
        tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        delta = int(state.global_step) - run.state.step
        if run.step(samples=self._samples_per_step * max(delta, 0), tokens=max(0, tokens - run.tokens_seen),
                    steps=delta) or run.state.stop:
            control.should_training_stop = True

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if self.run is None or logs is None or self._in_summary_log:
            return
        run = self.run
        # a log at a logging step reuses what that step's log_row just accounted (accounting costs ms)
        figures = run.last_figures if run.last_figures_step == run.state.step else run.figures()
        logs.update(figures)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(figures)

    # -- end ----------------------------------------------------------------------------------------
    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        self.summary = run.finish()
        if self._handler is not None:  # the summary through the Trainer's own loggers
            self._in_summary_log = True
            try:
                self._handler.on_log(args, state, control, summary_metrics(self.summary))
            finally:
                self._in_summary_log = False
