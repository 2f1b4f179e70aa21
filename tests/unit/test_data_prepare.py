"""`greenstack data prepare`: tokenisation as a measured, schedulable job whose cache training runs reuse and
whose energy/emissions they report as an amortised share."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("datasets")  # the `hf` extra (in `dev`, so CI has it)

from greenstack import cli  # noqa: E402
from greenstack.data.builders import synthetic_text_rows  # noqa: E402
from greenstack.data.cache_ledger import attach_prepare_share, ledger_path, read_ledger  # noqa: E402
from greenstack.errors import ConfigError  # noqa: E402
from greenstack.prepare import compose_prepare, prepare  # noqa: E402
from tests.conftest import FAST, read_jsonl  # noqa: E402
from tests.helpers.clock import SimClock

JOB = ["carbon=static", "energy=tdp", "energy.tdp_w=100", "energy.interval_s=0.05"]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """A small jsonl corpus (no label column: an LM corpus) and a private cache dir."""
    monkeypatch.setenv("GREENSTACK_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GREENSTACK_START_NOW", raising=False)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    texts, _ = synthetic_text_rows(48, 3, seed=1)
    path = tmp_path / "corpus" / "part-0.jsonl"
    path.parent.mkdir()
    pd.DataFrame({"text": texts}).to_json(path, orient="records", lines=True)
    return path.parent


def _data(corpus: Path) -> list[str]:
    return ["data=hf_local", f"data.path={corpus}", "data.tokenizer=byte", "data.block_size=16", "data.batch_size=4"]


def _no_tokenising(monkeypatch) -> list[str]:
    """Make any tokenisation or reading of the corpus fail the test (the cache must be used)."""
    calls: list[str] = []

    def forbidden(*a, **k):
        calls.append("encode")
        raise AssertionError("tokenised again although the cache was prepared")

    monkeypatch.setattr("greenstack.data.lm.TextTokenizer.encode", forbidden)
    monkeypatch.setattr("greenstack.data.hf._load", forbidden)
    return calls


def _cache_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "cache" / "data" / "tokenized").glob("*")) \
        if (tmp_path / "cache" / "data" / "tokenized").is_dir() else []


def test_prepare_writes_the_cache_and_a_measured_run_and_a_rerun_is_a_no_op(corpus, tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "prep"
    code = cli.main(["data", "prepare", *_data(corpus), *JOB, f"hydra.run.dir={run_dir}"])
    out = capsys.readouterr().out
    assert code == 0 and "tokenised" in out and str(run_dir) in out
    summary = json.loads((run_dir / "sustainability.json").read_text())
    metrics = summary["metrics"]
    assert summary["status"] == "completed"
    energy = metrics["energy/total_kwh"]
    assert energy["value"] > 0 and energy["provenance"] in ("measured", "estimated") and "tdp" in energy["source"]
    assert metrics["carbon/total_kg_co2e"]["value"] > 0 and "static" in metrics["carbon/total_kg_co2e"]["source"]
    assert metrics["data/tokens"]["value"] > 0 and metrics["data/tokens"]["provenance"] == "measured"
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "emissions.csv").is_file()
    cache = [p for p in _cache_files(tmp_path) if p.suffix == ".pt"]
    assert len(cache) == 1 and not [p for p in _cache_files(tmp_path) if p.name.endswith(".tmp")]
    (record,) = read_ledger(ledger_path(cache[0]))
    assert record["event"] == "prepare" and record["run_dir"] == str(run_dir.resolve())
    assert record["figures"]["energy/total_kwh"]["value"] == energy["value"]

    calls = _no_tokenising(monkeypatch)
    again = tmp_path / "prep2"
    code = cli.main(["data", "prepare", *_data(corpus), *JOB, f"hydra.run.dir={again}"])
    out = capsys.readouterr().out
    assert code == 0 and "nothing to do" in out and record["run_id"] in out
    assert not again.exists() and calls == [] and len(read_ledger(ledger_path(cache[0]))) == 1


def test_training_reuses_the_prepared_cache_and_reports_its_share(corpus, tmp_path, monkeypatch):
    from greenstack import runner
    from greenstack.compose import compose_with_problems

    cfg, _ = compose_prepare([*_data(corpus), *JOB])
    done = prepare(cfg, tmp_path / "prep")
    assert done.prepared
    prep = json.loads((tmp_path / "prep" / "sustainability.json").read_text())["metrics"]
    calls = _no_tokenising(monkeypatch)
    model = ["task=causal_lm", "model=gpt2_tiny", "model.config.n_layer=1", "model.config.n_embd=16",
             "model.config.n_head=2", "model.config.n_positions=16"]
    train_cfg, problems = compose_with_problems([*FAST, *model, *_data(corpus), *JOB])
    assert train_cfg is not None and not problems
    runner.run(train_cfg, tmp_path / "train")
    assert calls == []
    metrics = json.loads((tmp_path / "train" / "sustainability.json").read_text())["metrics"]
    share = metrics["data/prepare_energy_kwh_share"]
    assert share["value"] == pytest.approx(prep["energy/total_kwh"]["value"])  # the only run so far: all of it
    assert share["provenance"] == prep["energy/total_kwh"]["provenance"] and "1 run that used" in share["source"]
    assert metrics["data/prepare_kg_co2e_share"]["value"] == pytest.approx(prep["carbon/total_kg_co2e"]["value"])
    assert metrics["data/prepare_run"]["value"] == done.summary["run_id"]
    assert str(done.run_dir.resolve()) in share["source"]
    assert any(r.get("event") == "use" for r in read_ledger(ledger_path(done.plan.path)))


def test_the_share_divides_by_the_runs_that_used_the_cache_so_far(tmp_path):
    cache = tmp_path / "abc.pt"
    cache.write_bytes(b"x")
    ledger = ledger_path(cache)
    ledger.write_text(json.dumps({"event": "prepare", "run_id": "p1", "run_dir": "/runs/p1", "figures": {
        "energy/total_kwh": {"value": 0.6, "provenance": "measured"},
        "carbon/total_kg_co2e": {"value": 0.3, "provenance": "estimated"}}}) + "\n" + '{"event": "use", "ru')

    def share(run_id: str) -> dict:
        data = SimpleNamespace(cache_path=cache, cache_hit=True, figures={})
        attach_prepare_share(data, run_id=run_id, run_dir=tmp_path / run_id)
        return data.figures

    assert share("a")["data/prepare_energy_kwh_share"].value == pytest.approx(0.6)  # torn line skipped
    assert share("b")["data/prepare_energy_kwh_share"].value == pytest.approx(0.3)
    third = share("c")
    assert third["data/prepare_kg_co2e_share"].value == pytest.approx(0.1)
    assert third["data/prepare_kg_co2e_share"].provenance == "estimated" and "3 runs" in \
        third["data/prepare_kg_co2e_share"].source
    assert share("b")["data/prepare_energy_kwh_share"].value == pytest.approx(0.3)  # a resumed run keeps its place
    fresh = SimpleNamespace(cache_path=cache, cache_hit=False, figures={})  # tokenised by the run itself
    attach_prepare_share(fresh, run_id="d", run_dir=tmp_path)
    assert fresh.figures == {} and len(read_ledger(ledger)) == 4


def test_a_bad_data_path_exits_2_and_writes_nothing(corpus, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["data", "prepare", "data=hf_local", f"data.path={tmp_path / 'nope'}", *JOB])
    err = capsys.readouterr().err
    assert code == 2 and "data.path" in err and "no such file" in err and "Traceback" not in err
    assert not (tmp_path / "outputs").exists() and _cache_files(tmp_path) == []
    code = cli.main(["data", "prepare", "data=stream", "data.url=/x", *JOB])
    assert code == 2 and "no tokenisation cache to prepare" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="training loop to pause"):
        compose_prepare([*_data(corpus), "scheduler=pause_resume"])


def test_a_failure_while_tokenising_leaves_no_cache_file(corpus, tmp_path, monkeypatch):
    cfg, run_dir = compose_prepare([*_data(corpus), *JOB, "data.text_column=body"])  # found only on reading
    with pytest.raises(ConfigError, match="column 'body' not in"):
        prepare(cfg, tmp_path / "prep")
    assert _cache_files(tmp_path) == []  # neither the cache nor its ledger nor a temporary file
    assert json.loads((tmp_path / "prep" / "sustainability.json").read_text())["status"] == "failed"


def test_python_stdlib_prepares_the_cache_its_training_runs_read(tmp_path, monkeypatch):
    monkeypatch.setenv("GREENSTACK_CACHE_DIR", str(tmp_path / "cache"))
    from greenstack.data import python_stdlib

    small = ["data=python_stdlib", "data.tokenizer=byte", "data.max_files=4", "data.max_bytes=40000",
             "data.block_size=32", "data.batch_size=2"]
    cfg, _ = compose_prepare([*small, *JOB])
    done = prepare(cfg, tmp_path / "prep")
    assert done.prepared and done.plan.path.is_file() and "standard library" in done.plan.describe
    calls = _no_tokenising(monkeypatch)
    data = python_stdlib(tokenizer="byte", max_files=4, max_bytes=40000, block_size=32, batch_size=2)
    assert data.cache_hit and data.cache_path == done.plan.path and calls == []


def test_prepare_waits_for_the_low_carbon_window_and_records_its_start(corpus, tmp_path):
    times = pd.date_range("2022-11-01", "2023-01-20", freq="h", tz="UTC", inclusive="left")
    trace = tmp_path / "trace.csv"
    pd.DataFrame({"timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  "carbon_intensity": np.where(times.hour.isin((2, 3, 4, 5)), 100.0, 300.0)}).to_csv(trace, index=False)
    sched = ["scheduler=forecast_window", f"scheduler.trace={trace}", "scheduler.duration=3h",
             "scheduler.replan=false", "scheduler.tick_s=600"]
    cfg, _ = compose_prepare([*_data(corpus), *JOB, *sched])
    clock = SimClock("2023-01-09T10:30:00+00:00")
    done = prepare(cfg, tmp_path / "prep", clock=clock.time, sleep=clock.sleep)
    assert done.prepared
    assert datetime.fromtimestamp(clock.t, tz=timezone.utc) == datetime(2023, 1, 10, 2, tzinfo=timezone.utc)
    actions = [r["data"]["action"] for r in read_jsonl(tmp_path / "prep" / "audit.jsonl") if r["kind"] == "schedule"]
    assert actions == ["wait", "start"]
    metrics = json.loads((tmp_path / "prep" / "sustainability.json").read_text())["metrics"]
    assert metrics["scheduler/wait_s"]["value"] == pytest.approx(15.5 * 3600)
    assert metrics["scheduler/expected_saving_pct"]["value"] > 50
    assert [d["action"] for d in json.loads(metrics["scheduler/decisions"]["value"])] == ["wait", "start"]
    later = SimClock("2023-01-09T10:30:00+00:00")  # a prepared cache: no waiting at all
    assert not prepare(cfg, tmp_path / "prep2", clock=later.time, sleep=later.sleep).prepared
    assert later.t == datetime(2023, 1, 9, 10, 30, tzinfo=timezone.utc).timestamp()


def test_prepare_with_scheduler_region_records_the_chosen_region(corpus, tmp_path):
    cfg, _ = compose_prepare([*_data(corpus), *JOB, "scheduler=region", "scheduler.candidates=[GB,DE-LU]"])
    assert prepare(cfg, tmp_path / "prep").prepared
    metrics = json.loads((tmp_path / "prep" / "sustainability.json").read_text())["metrics"]
    (decision,) = json.loads(metrics["scheduler/decisions"]["value"])
    assert decision["action"] == "choose_region" and decision["choice"]["zone"] == "GB"  # GB is the cleaner grid


def test_long_tokenisation_prints_progress_lines(caplog):
    from greenstack.data.lm import build_tokenizer, encode_with_progress

    with caplog.at_level("INFO", logger="greenstack"):
        ids = encode_with_progress(build_tokenizer("byte"), ["ab"] * 10, "the train split", chunk=3, every_s=0.0)
    assert ids == [[97, 98]] * 10
    lines = [r.getMessage() for r in caplog.records if "tokenising the train split" in r.getMessage()]
    assert lines and lines[0].startswith("tokenising the train split: 3/10 documents")


def test_jobs_started_in_the_same_second_get_their_own_run_dirs(tmp_path, monkeypatch):
    from greenstack.prepare import _fresh_run_dir

    monkeypatch.chdir(tmp_path)
    now = datetime(2026, 12, 4, 23, 0, 5, tzinfo=timezone.utc)
    first = _fresh_run_dir(now)
    assert first == Path("outputs/data-prepare/2026-12-04/23-00-05")
    first.mkdir(parents=True)
    assert _fresh_run_dir(now) == Path("outputs/data-prepare/2026-12-04/23-00-05-1")
