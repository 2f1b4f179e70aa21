"""Replaying a recorded run's decisions (efficiency.decisions_from) trains exactly that run's configuration."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import greenstack.runner as runner
from greenstack.compose import compose_with_problems
from greenstack.errors import ConfigError
from greenstack.validate import validate_config
from tests.conftest import FAST
from tests.helpers.hooks import fire

# pinned to the CPU: two runs that are not trainer.deterministic end bit-identical only there (on CUDA,
# deterministic kernels would also freeze the measured decisions this test records and replays)
BASE = ["recipe=quickstart", *FAST, "trainer.device=cpu", "model.name=resnet10t", "data=synthetic_image", "data.num_samples=256",
        "data.image_size=16", "data.batch_size=32", "efficiency=default",
        "efficiency.amp.enabled=false", "efficiency.activation_checkpointing.enabled=false",
        "efficiency.padding.enabled=false", "efficiency.sdpa.enabled=false",
        "efficiency.alerts.low_gpu_utilization.max_doublings=1", "efficiency.alerts.low_gpu_utilization.probe_steps=1"]


def low_utilization():
    """A utilisation reader for the recorded run: the GPU looks idle, so the alert doubles the batch."""
    return lambda: 5.0


def _problems(*overrides: str) -> tuple:
    cfg, problems = compose_with_problems([*BASE, *overrides])
    return cfg, problems + (validate_config(cfg) if cfg is not None else [])


def _run(tmp_path, name: str, *overrides: str) -> tuple[dict, dict]:
    cfg, problems = _problems(*overrides)
    assert not problems, problems
    run_dir = tmp_path / name
    summary = runner.run(cfg, run_dir)
    return summary, load_file(str(run_dir / "model.safetensors"))


def _decision(run_dir, policy: str) -> dict:
    rows = [json.loads(line)["data"] for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    return next(r for r in rows if r.get("policy") == policy and ("on" in r or r.get("acted")))


def _metric(summary: dict, key: str):
    return summary["metrics"][key]["value"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and (a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_replayed_decisions_give_the_recorded_runs_weights_not_what_a_probe_would_choose(tmp_path, one_torch_thread):
    # the recorded run: channels_last forced, and an idle-looking GPU makes the alert double the batch
    # before training
    recorded, expected = _run(tmp_path, "recorded", "efficiency.channels_last.mode=on",
                              "+efficiency.alerts.utilization_reader._target_=tests.unit.test_replay.low_utilization")
    assert _metric(recorded, "efficiency/channels_last_enabled") == 1
    raised = _decision(tmp_path / "recorded", "efficiency.alerts")["batch_size"]
    assert raised > 32

    # the replay is configured so that measuring would choose otherwise: auto channels_last needing a 1000x
    # gain, and no utilisation reading at all (CPU); it follows the record instead
    replay = ["efficiency.channels_last.mode=auto", "efficiency.channels_last.min_speedup=1000"]
    replayed, got = _run(tmp_path, "replayed", *replay, f"efficiency.decisions_from={tmp_path / 'recorded'}")
    assert _metric(replayed, "efficiency/channels_last_enabled") == 1
    assert "replayed from" in _decision(tmp_path / "replayed", "efficiency.channels_last")["reason"]
    alert = _decision(tmp_path / "replayed", "efficiency.alerts")
    assert alert["replayed"] and alert["batch_size"] == raised
    assert _same(got, expected), "the replay trained another configuration than the recorded run"

    # without the record, the same configuration (deterministic: frozen, nothing measured) keeps NCHW at 32
    frozen, other = _run(tmp_path, "frozen", *replay, "trainer.deterministic=true")
    assert _metric(frozen, "efficiency/channels_last_enabled") == 0 and _metric(frozen, "trainer/deterministic") == 1
    assert "frozen" in _decision(tmp_path / "frozen", "efficiency.channels_last")["reason"]
    assert not _same(other, expected)


def test_a_missing_or_edited_decision_log_is_a_config_problem(tmp_path):
    cfg, problems = _problems(f"efficiency.decisions_from={tmp_path / 'nowhere'}")
    assert [p.key for p in problems] == ["efficiency.decisions_from"] and "no decision log" in problems[0].reason
    run = tmp_path / "run"
    run.mkdir()
    (run / "audit.jsonl").write_text('{"seq": 1, "prev": "0", "kind": "alert", "data": {}, "hash": "bad"}\n')
    cfg, problems = _problems(f"efficiency.decisions_from={run}")
    assert problems and "fails verification" in problems[0].reason
    with pytest.raises(ConfigError):
        runner.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


@pytest.mark.parametrize("value", ["maybe", 1, "yes"])
def test_trainer_deterministic_accepts_only_false_true_or_warn(value):
    _, problems = _problems(f"trainer.deterministic={value}")
    assert [p.key for p in problems] == ["trainer.deterministic"], problems
    assert "bool or 'warn'" in problems[0].reason or "false, true or warn" in problems[0].reason


# -- single policies: a recorded decision is taken without measuring; a deterministic run keeps its config --
def _loop(policy, *, deterministic: bool = False):
    from greenstack.data import synthetic_image
    from greenstack.engine.loop import Trainer, TrainerConfig
    from greenstack.engine.optim import Optim

    data = synthetic_image(num_samples=64, num_classes=2, batch_size=8, image_size=8)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    return Trainer(model, data.train, Optim(lr=1e-3), TrainerConfig(max_duration="1ba", progress=False, device="cpu",
                                                                     deterministic=deterministic),
                   policies=[policy], batch_size=8)


def test_batch_size_search_replays_the_recorded_batch_and_lr_factor_without_trials(monkeypatch):
    import greenstack.policies.efficiency.batch_size as bs

    monkeypatch.setattr(bs, "search_batch_size", lambda *a, **k: pytest.fail("a replayed search must not measure"))
    policy = bs.BatchSizeSearch()
    assert policy.replay([{"policy": "efficiency.batch_size", "on": True, "batch_size": 32, "lr_factor": 2.0}], "RUN")
    trainer = _loop(policy)
    state = trainer.fit()
    assert state.batch_size == 32 and trainer.train_loader.batch_size == 32
    assert state.optimizer.param_groups[0]["initial_lr"] == pytest.approx(2e-3)
    assert "replayed from RUN" in policy.reason

    frozen = bs.BatchSizeSearch()
    state = _loop(frozen, deterministic=True).fit()
    assert state.batch_size == 8 and "frozen" in frozen.reason and frozen.on is False


def test_region_choice_replays_the_recorded_zone_without_ranking(tmp_path):
    from greenstack.engine.events import Event
    from greenstack.engine.state import State
    from greenstack.policies.scheduler.region import RegionChoice

    policy = RegionChoice(candidates=["IN-WE", "CA-ON"], w_carbon=1.0, w_price=0.0, duration="2h")
    assert policy.replay([{"policy": "region", "action": "choose_region", "choice": {"zone": "IN-WE"}}], "RUN")
    st = State(model=torch.nn.Linear(1, 1), run_dir=str(tmp_path))
    fire(policy, Event.INIT, st)
    assert st.region == "IN-WE" and policy.ranking == []  # the recorded zone, not today's cleaner CA-ON
    assert policy.decisions[0]["notes"] == ["decision replayed from RUN"]
