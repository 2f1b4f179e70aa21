"""`greenstack.io.jsonable`: the one converter of decision records, audit logs, trackers and snapshots."""

from __future__ import annotations

import json
import math
import random
from datetime import datetime, timedelta, timezone

import numpy as np
import torch

from greenstack.io import jsonable


def test_plain_json_types_from_numpy_torch_datetimes_and_non_finite_floats():
    value = {
        1: (np.float32(0.5), np.int64(3), np.array([1, 2])),
        "tensor": torch.tensor(2.0),
        "matrix": torch.ones(2, 2),
        "when": datetime(2024, 1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
        "bad": [math.nan, math.inf, np.float64("nan")],
        "dtype": torch.bfloat16,
        "ok": [None, True, 7, "x"],
    }
    out = jsonable(value)
    assert out == {
        "1": [0.5, 3, [1, 2]],
        "tensor": 2.0,
        "matrix": [[1.0, 1.0], [1.0, 1.0]],
        "when": "2024-01-01T00:00:00+00:00",
        "bad": [None, None, None],
        "dtype": "torch.bfloat16",
        "ok": [None, True, 7, "x"],
    }
    json.dumps(out, allow_nan=False)  # strict JSON


def test_the_python_rng_state_survives_the_round_trip_as_lists():
    state = random.getstate()
    plain = jsonable(state)
    json.dumps(plain)

    def as_tuple(obj):
        return tuple(as_tuple(v) for v in obj) if isinstance(obj, list) else obj

    assert as_tuple(plain) == state
