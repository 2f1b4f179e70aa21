"""Shared fixtures: run the CLI as a user would, compose configs, small data files."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# tests that compare runs bit for bit on CUDA (trainer.deterministic) need cuBLAS's deterministic workspace
# configured before the process's first cuBLAS handle; a run sets it itself, a test process does it here
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _restore_logging():
    """Undo what a test's in-process CLI run did to logging.

    Hydra's job logging (and libraries that call basicConfig) add handlers bound to the stderr of
    that moment, which is pytest's capture stream and is closed after the test, and raise levels to
    INFO. Left in place, a later test's library INFO record (httpx logs every request) goes to a
    closed stream and prints '--- Logging error ---' into that test's stderr.
    """
    manager = logging.Logger.manager

    def loggers() -> dict[str, logging.Logger]:
        found = {name: lg for name, lg in manager.loggerDict.items() if isinstance(lg, logging.Logger)}
        found[""] = logging.getLogger()
        return found

    before = {name: (list(lg.handlers), lg.level) for name, lg in loggers().items()}
    yield
    for name, lg in loggers().items():
        handlers, level = before.get(name, ([], None))
        for handler in list(lg.handlers):
            if handler not in handlers:
                lg.removeHandler(handler)
        if level is not None:  # a logger created during the test keeps the level its library gave it
            lg.setLevel(level)


def pytest_sessionstart(session: pytest.Session) -> None:
    """In CI every optional package is installed, so nothing may skip for lack of one: fail at once."""
    if os.environ.get("CI"):
        from tests.helpers.optional import OPTIONAL, missing

        absent = missing()
        if absent:
            raise pytest.UsageError("CI is set but these optional packages do not import: "
                                    + "; ".join(f"{n} ({OPTIONAL[n]})" for n in absent)
                                    + ". Install the dev extra (pip install -e .[dev]).")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "200"})
    env.pop("WANDB_API_KEY", None)
    env.update(extra or {})
    return env


@pytest.fixture
def cli(tmp_path):
    """Run `greenstack ...` in a subprocess (cwd = tmp_path); returns CompletedProcess with text output."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "greenstack", *args], cwd=cwd or tmp_path, env=_env(env),
                              capture_output=True, text=True, timeout=timeout)

    return run


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture
def text_csv_file(tmp_path) -> Path:
    """A small labelled text CSV (synthetic topic sentences)."""
    from greenstack.data.builders import synthetic_text_rows

    texts, labels = synthetic_text_rows(64, 4, seed=3)
    path = tmp_path / "texts.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(zip(texts, labels, strict=True))
    return path


#: overrides that make any recipe train 2 batches quickly on CPU
FAST = ["trainer.max_duration=2ba", "trainer.limit_eval_batches=1", "trainer.progress=false",
        "trainer.log_interval=1", "tracker=none", "energy.interval_s=0.2"]


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on shared cores: intra-op threads only add OpenMP stalls (20x slower when the other
    core is busy), so modules that use this run single-threaded and restore the setting afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
