"""A run that ends before its end (SIGTERM, Ctrl-C, an error) still writes what it spent, flagged partial."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import greenstack.runner as runner
from greenstack.compose import compose_with_problems
from greenstack.engine.events import Event
from greenstack.engine.policy import Policy
from tests.conftest import _env

#: a small run that would take minutes: it is always stopped long before its end
LONG = ["data=synthetic_image", "data.num_samples=64", "data.batch_size=8", "data.image_size=16",
        "model.name=resnet10t", "trainer.max_duration=10000ba", "trainer.log_interval=1", "trainer.progress=false",
        "trainer.limit_eval_batches=1", "tracker=none", "energy.interval_s=0.1", "carbon=static"]


def _steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return max((json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()),
               default=0)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_interrupts():
    """SIGINT raises KeyboardInterrupt in this process, as in a terminal, whatever started the suite."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _assert_partial(run_dir, status: str) -> dict:
    summary = json.loads((run_dir / "sustainability.json").read_text())
    assert summary["status"] == status and summary["partial"] is True
    metrics = summary["metrics"]
    assert metrics["energy/total_kwh"]["value"] > 0 and metrics["carbon/total_kg_co2e"]["value"] > 0
    assert metrics["train/steps"]["value"] >= 3
    for key in ("energy/total_kwh", "carbon/savings_vs_baseline", "cost/per_epoch_usd"):
        assert set(metrics[key]) == {"value", "unit", "provenance", "source"}
    rows = list(csv.DictReader((run_dir / "emissions.csv").open()))
    assert len(rows) == 1 and float(rows[0]["energy_consumed"]) > 0 and rows[0]["run_id"] == summary["run_id"]
    assert not (run_dir / "model.safetensors").exists()  # an unfinished model is not passed off as the result
    assert not list(run_dir.glob(".*.tmp"))  # nothing half-written
    return summary


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143),
                                                    pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_signal_mid_training_writes_partial_accounting(tmp_path, signum, code):
    run_dir = tmp_path / "run"
    # as from a terminal: a shell running the suite in the background would leave SIGINT ignored
    proc = subprocess.Popen([sys.executable, "-m", "greenstack", "train", *LONG, f"hydra.run.dir={run_dir}"],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    deadline = time.time() + 300
    while _steps(run_dir) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signum)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # never leave a run training behind the rest of the suite
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run kept going after {signal.Signals(signum).name}: {err[-2000:]}")
    assert proc.returncode == code, err[-3000:]
    summary = _assert_partial(run_dir, "interrupted")
    assert signal.Signals(signum).name in summary["end_reason"]
    said = [line for line in (out + err).splitlines() if "partial accounting" in line]
    assert len(said) == 1 and str(run_dir) in said[0] and "kWh" in said[0], out[-2000:] + err[-2000:]
    assert "Traceback" not in err


class FailAtStep(Policy):
    """Raises at step 3, as a bug in a policy or a model would."""

    events = frozenset({Event.STEP_END})

    def __init__(self) -> None:
        super().__init__(name="fail_at_step")

    def __call__(self, event, state, reporter):
        if state.step >= 3:
            raise RuntimeError("boom at step 3")


class SwallowsInterrupts(Policy):
    """Sends a signal at step 3 and swallows the raise, as a finaliser or callback Python ignores would."""

    events = frozenset({Event.STEP_END})

    def __init__(self, signum: int = int(signal.SIGTERM)) -> None:
        super().__init__(name="swallows")
        self.signum = signum

    def __call__(self, event, state, reporter):
        if state.step == 3:
            try:
                os.kill(os.getpid(), self.signum)
                time.sleep(1)  # the handler runs here
            except KeyboardInterrupt:
                pass
        if state.step == 6:
            raise RuntimeError("the run kept training after its SIGTERM")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_swallowed_signal_still_stops_the_run_at_the_next_step_end(tmp_path, signum, code, ctrl_c_interrupts):
    cfg, problems = compose_with_problems([*LONG, "+policies.swallow._target_=" + f"{__name__}.SwallowsInterrupts",
                                           f"+policies.swallow.signum={int(signum)}"])
    assert not problems, problems
    with pytest.raises(KeyboardInterrupt) as err:
        runner.run(cfg, tmp_path)
    assert getattr(err.value, "exit_code", None) == code
    summary = _assert_partial(tmp_path, "interrupted")
    assert summary["metrics"]["train/steps"]["value"] == 3


def test_failing_run_writes_partial_accounting(tmp_path):
    cfg, problems = compose_with_problems([*LONG, "+policies.fail._target_=" + f"{__name__}.FailAtStep"])
    assert not problems, problems
    with pytest.raises(RuntimeError, match="boom"):
        runner.run(cfg, tmp_path)
    summary = _assert_partial(tmp_path, "failed")
    assert summary["end_reason"] == "boom at step 3"


def test_resumed_run_row_replaces_its_interrupted_rows(tmp_path):
    from greenstack.measure import write_emissions_csv

    path = tmp_path / "emissions.csv"
    write_emissions_csv(path, {"run_id": "other", "emissions": 1.0})
    write_emissions_csv(path, {"run_id": "r1", "emissions": 0.2})  # the interrupted segment (partial)
    write_emissions_csv(path, {"run_id": "r1", "emissions": 0.5}, replace_run_id="r1")  # the whole resumed run
    rows = list(csv.DictReader(path.open()))
    assert [(r["run_id"], float(r["emissions"])) for r in rows] == [("other", 1.0), ("r1", 0.5)]
