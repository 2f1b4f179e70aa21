"""The runner is a recipe in phases: plan_start -> setup -> fit -> report, then cleanup whatever happened."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from greenstack.runner import RunContext, TrainRecipe

PHASES = ("plan_start", "setup", "fit", "report_phase")


class _Recorded(TrainRecipe):
    """The real ordering of `TrainRecipe.run`, with each phase replaced by a note (and one may fail)."""

    def __init__(self, tmp_path, fail_in: str | None = None) -> None:
        super().__init__(OmegaConf.create({"trainer": {"deterministic": False}}), RunContext(run_dir=tmp_path))
        self.calls: list[str] = []
        self.fail_in = fail_in

    def _note(self, name: str) -> None:
        self.calls.append(name)
        if name == self.fail_in:
            raise RuntimeError(f"boom in {name}")

    def plan_start(self):
        self._note("plan_start")

    def setup(self):
        self._note("setup")

    def fit(self):
        self._note("fit")
        return "state"

    def report_phase(self, state):
        assert state == "state"
        self._note("report_phase")
        return {"flat": {}}

    def report_partial(self, error):
        self.calls.append(f"report_partial: {error}")

    def cleanup(self):
        self.calls.append(f"cleanup (exit code {self.exit_code})")


def test_phases_run_in_order_then_cleanup(tmp_path):
    recipe = _Recorded(tmp_path)
    assert recipe.run() == {"flat": {}}
    assert recipe.calls == [*PHASES, "cleanup (exit code 0)"]


@pytest.mark.parametrize("phase", PHASES)
def test_a_failure_in_any_phase_stops_the_later_ones_and_still_cleans_up(tmp_path, phase):
    recipe = _Recorded(tmp_path, fail_in=phase)
    with pytest.raises(RuntimeError, match=f"boom in {phase}"):
        recipe.run()
    done = list(PHASES[: PHASES.index(phase) + 1])
    assert recipe.calls == [*done, f"report_partial: boom in {phase}", "cleanup (exit code 1)"]


def test_cleanup_closes_only_what_was_opened(tmp_path):
    """A run that failed before its tracker started has no tracker, pool or report to close."""
    recipe = TrainRecipe(OmegaConf.create({"trainer": {"deterministic": False}}), RunContext(run_dir=tmp_path))
    recipe.cleanup()  # nothing opened: nothing to do, no error
    recipe.report_partial(RuntimeError("early"))  # no partial accounting before the tracker started
    assert not (tmp_path / "sustainability.json").exists()


def test_the_run_context_drops_its_hooks_when_the_run_ends(tmp_path):
    context = RunContext(run_dir=tmp_path)
    context.preemption.coordinate(lambda local: None)
    context.preemption.request(10)
    context.close()
    assert context.preemption.coordinator is None and not context.preemption.honoured
    assert context.preemption.requested_signum == 10  # the launcher reads what happened after the run


def test_the_report_is_built_from_what_the_run_holds_in_memory(tmp_path):
    """metrics.jsonl's rows as kept by the writer equal the file's; report.html needs no read-back."""
    import math

    import numpy as np

    from greenstack.report.html import finish_run_report
    from greenstack.report.tco import load_run
    from greenstack.tracking.base import JsonlWriter

    first = JsonlWriter(tmp_path, keep_rows=True)  # an earlier segment of a resumed run
    first.log({"train/loss": 1.5, "energy/total_kwh": np.float32(0.25)}, step=1)
    first.close()
    writer = JsonlWriter(tmp_path, keep_rows=True)
    writer.log({"train/loss": math.nan, "energy/total_kwh": 0.5, "val/accuracy": 0.75}, step=2)
    writer.close()
    summary = {"run_id": "r1", "metrics": {"energy/total_kwh": {"value": 0.5, "unit": "kWh",
                                                                "provenance": "measured", "source": "test"}}}
    on_disk = load_run(_with_summary(tmp_path, summary))
    assert writer.rows == on_disk.metrics and len(writer.rows) == 2
    assert load_run(tmp_path, summary=summary, metrics=writer.rows) == on_disk
    (tmp_path / "metrics.jsonl").unlink()  # the report must not need to read the files back
    (tmp_path / "sustainability.json").unlink()
    out = finish_run_report(tmp_path, summary=summary, metrics=writer.rows)
    assert out is not None and out.is_file() and "r1" in out.read_text()


def _with_summary(run_dir, summary):
    import json

    (run_dir / "sustainability.json").write_text(json.dumps(summary))
    return run_dir
