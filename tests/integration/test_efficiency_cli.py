"""`efficiency=default` from the command line: validates, toggles per policy, trains 2 batches on CPU."""

from __future__ import annotations

import json

from greenstack.compose import compose_with_problems
from greenstack.runner import build_policies
from greenstack.validate import validate_config
from tests.conftest import read_jsonl

STACK = {"batch_size", "padding", "amp", "sdpa", "channels_last", "activation_checkpointing", "compile",
         "power_limit", "alerts"}


def efficiency_policies(*overrides: str) -> dict[str, object]:
    cfg, problems = compose_with_problems(["efficiency=default", *overrides])
    assert cfg is not None and not problems
    assert validate_config(cfg) == []
    return {p.name.removeprefix("efficiency."): p for p in build_policies(cfg) if p.name.startswith("efficiency.")}


def test_default_stack_validates_and_each_policy_toggles_from_the_command_line():
    policies = efficiency_policies()
    assert set(policies) == STACK
    assert {k for k, p in policies.items() if not p.enabled} == {"batch_size", "compile", "power_limit"}  # opt-in
    assert not efficiency_policies("efficiency.amp.enabled=false")["amp"].enabled
    assert "amp" not in efficiency_policies("~efficiency.amp")
    assert efficiency_policies("efficiency.compile.enabled=true")["compile"].enabled
    cfg, _ = compose_with_problems(["efficiency=none"])
    assert not [p for p in build_policies(cfg) if p.name.startswith("efficiency.")]


def test_greenstack_train_with_the_default_stack_trains_two_batches_on_cpu(cli, tmp_path):
    run_dir = tmp_path / "run"
    result = cli("train", "data=synthetic_image", "model.name=resnet10t", "data.num_samples=64",
                 "trainer.max_duration=2ba", "trainer.progress=false", "tracker=none", "efficiency=default",
                 f"hydra.run.dir={run_dir}", env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    for line in ("amp: ", "channels_last: ", "activation_checkpointing: "):  # each decision, with its reason
        assert any(x.split(" - ")[-1].startswith(line) and " — " in x for x in output.splitlines()), line
    assert "sdpa: no effect — ResNet has no attention layers" in output
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [2]  # log_interval 10: the last step is logged
    assert any("efficiency/amp_enabled" in r for r in rows)
    metrics = json.loads((run_dir / "sustainability.json").read_text())["metrics"]
    for key in ("amp_speedup", "channels_last_speedup", "activation_checkpointing_activation_ratio"):
        fig = metrics[f"efficiency/{key}"]
        assert fig["provenance"] == "measured" and fig["value"] > 0, key
        assert "first batch" in fig["source"], fig["source"]
    assert metrics["efficiency/amp_enabled"]["value"] in (0, 1) and metrics["efficiency/amp_enabled"]["source"]
