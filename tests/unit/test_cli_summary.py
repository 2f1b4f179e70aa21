"""The end-of-run table stays readable: decision logs and unavailable figures are not dumped on screen."""

from __future__ import annotations

import json

import pytest

from greenstack.cli.train import summary_cell


@pytest.mark.parametrize("value, unit, shown", [
    (0.123456, "kg", "0.1235 kg"),
    (7, "step", "7 step"),
    (None, "%", "n/a"),
    (json.dumps([{"policy": "immediate"}, {"policy": "x"}]), "json", "2 entries (sustainability.json)"),
    (json.dumps([{"policy": "immediate"}]), "json", "1 entry (sustainability.json)"),
    ({"a": 1, "b": 2}, "", "2 keys (sustainability.json)"),
    ("resnet18", "", "resnet18"),
    ("not json", "json", "not json"),
])
def test_summary_cell(value, unit, shown):
    assert summary_cell(value, unit) == shown
