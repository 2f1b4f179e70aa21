"""greenstack inside other frameworks' training loops (`hf`, `lightning`); each needs its extra installed.

The callbacks share `CallbackConfig`: the run dir and the same config groups as `greenstack.track`,
composed and validated when the callback is built (a bad config fails before training starts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

SUMMARY_PREFIX = "greenstack/"


class CallbackConfig:
    """What a framework callback needs to open its `TrackedRun` once the trainer knows its length."""

    def __init__(self, run_dir: str | Path | None, *, config: str | Path | None,
                 carbon: str | Mapping[str, Any] | None, energy: str | Mapping[str, Any] | None,
                 scheduler: str | Mapping[str, Any] | None, overrides: Sequence[str], run_name: str | None,
                 meters: list[Any] | None, clock: Callable[[], float] | None,
                 sleep: Callable[[float], None] | None) -> None:
        from greenstack.tracked import compose_groups

        self.cfg = compose_groups(config, carbon=carbon, energy=energy, scheduler=scheduler, overrides=overrides)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.run_name, self.meters, self.clock, self.sleep = run_name, meters, clock, sleep

    def open(self, default_dir: str | Path, *, model: Any, total_steps: int, log_every: int, rank: int = 0) -> Any:
        from greenstack.tracked import TrackedRun

        run = TrackedRun(self.cfg, self.run_dir or Path(default_dir), run_name=self.run_name, model=model,
                         total_steps=total_steps, log_every=log_every, meters=self.meters, clock=self.clock,
                         sleep=self.sleep)
        run.state.rank = rank
        return run


def summary_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """The run summary's numeric figures, prefixed `greenstack/`, for a trainer's loggers."""
    flat = summary.get("flat", {})
    out = {f"{SUMMARY_PREFIX}{k}": float(v) for k, v in flat.items() if isinstance(v, (int, float))
           and not isinstance(v, bool)}
    out[f"{SUMMARY_PREFIX}stopped_early"] = 1.0 if summary.get("stopped_early") else 0.0
    return out


def missing(framework: str, extra: str, error: ImportError) -> ImportError:
    """The ImportError a user sees when the framework of an integration is not installed."""
    return ImportError(f"greenstack.integrations.{extra} needs {framework}, which is not installed "
                       f"({error}): pip install 'greenstack[{extra}]'")
