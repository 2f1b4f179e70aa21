"""greenstack: sustainable ML training with measured energy, hourly carbon and cost."""

__version__ = "0.1.0"

__all__ = ["CarbonBudgetExceeded", "track", "wait_for_window"]


def __getattr__(name: str):  # noqa: ANN202 - lazy: `import greenstack` stays light (no torch, no frameworks)
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("greenstack.tracked"), name)
    raise AttributeError(f"module 'greenstack' has no attribute {name!r}")
