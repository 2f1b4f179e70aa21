"""Chaos: one kill of each kind across the checkpoint cycle (SIGKILL during training, mid-write, between
tiers; SIGTERM; SIGTERM then SIGKILL) -> every resumed run bit-identical, no corrupt checkpoint loaded
(issue 22). Runs `python -m benchmarks.chaos` as CI would."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, _env


@pytest.mark.slow
def test_random_kills_across_the_checkpoint_cycle_resume_bit_identical(tmp_path):
    done = subprocess.run([sys.executable, "-m", "benchmarks.chaos", "--kills", "5", "--seed", "1",
                           "--workdir", str(tmp_path)], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=900)
    bench = [line for line in done.stdout.splitlines() if line.startswith("BENCH ")]
    assert len(bench) == 1, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(bench[0].removeprefix("BENCH "))
    assert result == {"kills": 5, "bit_identical": 5, "corrupt_loads": 0}, done.stdout[-3000:]
    assert done.returncode == 0
    kinds = {line.split()[2] for line in done.stdout.splitlines() if line.startswith("trial ")}
    assert kinds == {"sigkill_training", "sigkill_mid_write", "sigkill_between_tiers", "sigterm",
                     "sigterm_then_sigkill"}
