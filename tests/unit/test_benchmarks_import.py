"""Every benchmark script still imports: they use the library's interfaces but no test runs most of them,
so a renamed or removed name would otherwise surface only when someone runs the benchmark."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py")
                    if p.stem != "__init__")


def test_the_benchmarks_folder_is_found():
    assert {"overhead", "pool", "checkpoint_stall"} <= set(BENCHMARKS)


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_module_imports(name):
    module = importlib.import_module(f"benchmarks.{name}")
    if not name.startswith("_"):
        assert callable(getattr(module, "main", None)), f"benchmarks/{name}.py has no main()"
