"""Weights & Biases tracker: offline unless the user configured W&B, one run per Hydra job."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Any, Literal

from greenstack.errors import ConfigError
from greenstack.io import jsonable
from greenstack.tracking.base import Tracker

log = logging.getLogger("greenstack")


def wandb_configured() -> bool:
    """Whether the user has W&B credentials (API key in the environment or a netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    """`auto` -> WANDB_MODE if set, online when credentials exist, offline otherwise."""
    if mode != "auto":
        return mode
    return os.environ.get("WANDB_MODE") or ("online" if wandb_configured() else "offline")


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, project: str = "greenstack", entity: str | None = None,
                 mode: Literal["auto", "online", "offline", "disabled"] = "auto", tags: list[str] | None = None,
                 group: str | None = None) -> None:
        if mode not in ("auto", "online", "offline", "disabled"):
            raise ConfigError("unknown W&B mode", key="tracker.mode", value=mode,
                              fix="use auto, online, offline or disabled")
        self.project, self.entity, self.mode, self.tags, self.group = project, entity, mode, tags or [], group
        self.run: Any = None
        self.run_dir: Path | None = None

    def start(self, *, run_dir: Path, run_id: str, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        mode = resolve_mode(self.mode)
        settings = wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True)
        self.run = wandb.init(project=self.project, entity=self.entity, name=run_name, id=run_id, resume="allow",
                              dir=str(run_dir), config=jsonable(config), mode=mode, tags=self.tags,
                              group=self.group, settings=settings, reinit="finish_previous")
        self.run_dir = Path(run_dir)
        log.info("W&B run %s (%s) in %s", run_id, mode, run_dir / "wandb")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self.run is not None:
            self.run.log(jsonable(metrics), step=step)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            # commit the pending history row first: committing it later would overwrite the summary
            # with the row's (running) values
            self.run.log({}, commit=True)
            for key, value in jsonable(values).items():
                self.run.summary[key] = value

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None

    def describe(self) -> str:
        return f"wandb ({resolve_mode(self.mode)})"
