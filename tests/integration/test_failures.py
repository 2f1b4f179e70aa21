"""A job that fails at run time: its own log holds the error, the terminal a short message, and
`report compare` lists it as failed (issue 15 item 3)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST

TINY = ["data=synthetic_image", "data.num_samples=32", "data.batch_size=16", "data.image_size=32",
        "model.name=resnet10t", *FAST]


@pytest.mark.slow
def test_failed_multirun_job_logs_its_error_and_compare_lists_it(cli, tmp_path):
    sweep = tmp_path / "sweep"
    done = cli("train", "-m", *TINY, "+model.kwargs.drop_rate=0.1,2.0", f"hydra.sweep.dir={sweep}")
    out = done.stdout + done.stderr
    assert done.returncode == 1, out[-3000:]
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out and "Error executing job" not in out
    assert "dropout probability has to be between 0 and 1" in out  # the cause, in one line
    log = (sweep / "1" / "train.log").read_text()
    assert "ValueError: dropout probability has to be between 0 and 1, but got 2.0" in log
    assert "Traceback (most recent call last)" in log  # the traceback lives in the job's log
    assert str(sweep / "1" / "train.log") in out  # the job table / message points at it
    assert "ValueError" not in (sweep / "0" / "train.log").read_text()
    compare = cli("report", "compare", str(sweep), "--json")
    assert compare.returncode == 0, compare.stderr
    runs = {r["label"]: r for r in json.loads(compare.stdout)["runs"]}
    assert set(runs) == {"0", "1"}
    assert runs["1"]["state"] == "failed" and runs["0"]["state"] == "completed"
    table = cli("report", "compare", str(sweep))
    assert "failed" in table.stdout
