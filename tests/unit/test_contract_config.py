"""Config contract (issue 16): a policy group is one config file plus one module, found in the config
itself; shared config blocks are composed, not pasted."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from greenstack.paths import conf_dir
from tests.conftest import FAST

MODULE = '''
import json
from pathlib import Path

from greenstack.engine.events import Event
from greenstack.engine.policy import Policy


class StepCounter(Policy):
    """Counts the steps it is dispatched; writes the count to `path` when training ends."""

    events = frozenset({Event.STEP_END, Event.FIT_END})

    def __init__(self, path: str, every: int = 1) -> None:
        super().__init__(name="counter")
        self.path, self.every, self.steps = path, every, 0

    def __call__(self, event, state, reporter):
        if event == Event.STEP_END:
            self.steps += 1
        else:
            Path(self.path).write_text(json.dumps({"steps": self.steps, "every": self.every}))
'''


def _new_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The whole addition: conf/<group>/<option>.yaml and the module with the policy."""
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "counting_policy.py").write_text(textwrap.dedent(MODULE))
    monkeypatch.syspath_prepend(str(tmp_path / "mod"))
    (tmp_path / "conf" / "counting").mkdir(parents=True)
    (tmp_path / "conf" / "counting" / "steps.yaml").write_text(textwrap.dedent(f"""\
        counter:
          _target_: counting_policy.StepCounter
          path: {tmp_path / 'count.json'}
          every: 1
        """))
    return tmp_path / "conf"


def test_a_new_policy_group_is_one_yaml_and_one_module(tmp_path, monkeypatch):
    """No registration anywhere: the group is found because its node's target is a Policy, it is
    validated, built, and dispatched every step; a bad value in it is reported under its key."""
    from greenstack.compose import compose_with_problems
    from greenstack.engine.groups import policy_groups
    from greenstack.validate import validate_config

    conf = _new_group(tmp_path, monkeypatch)
    extra = [f"hydra.searchpath=[file://{conf}]", "+counting=steps"]
    cfg, problems = compose_with_problems([*extra, "checkpointing=hierarchical"])
    assert not problems, problems
    groups = policy_groups(cfg)
    assert groups == ["scheduler", "checkpointing", "counting"]  # config order; `+group` comes last
    from greenstack.runner import build_policies, run

    names = [p.name for p in build_policies(cfg)]
    assert names[0] == "immediate" and names[-1] == "checkpointing" and "counter" in names  # checkpointing last

    bad, _ = compose_with_problems([*extra, "counting.counter.every=often"])
    assert [p.key for p in validate_config(bad)] == ["counting.counter.every"]

    cfg, problems = compose_with_problems([*extra, "data=synthetic_image", "data.num_samples=32",
                                           "data.batch_size=16", "data.image_size=16", "model.name=resnet10t",
                                           *FAST, "trainer.max_duration=3ba"])
    assert not problems, problems
    run(cfg, tmp_path / "run")
    assert json.loads((tmp_path / "count.json").read_text()) == {"steps": 3, "every": 1}


def test_policies_group_options_are_maps_of_named_policies():
    from greenstack.compose import compose_with_problems
    from greenstack.runner import build_policies

    cfg, problems = compose_with_problems(["policies=early_stopping", "policies.early_stopping.patience=5"])
    assert not problems, problems
    (stopper,) = [p for p in build_policies(cfg) if p.name == "early_stopping"]
    assert stopper.patience == 5
    cfg, _ = compose_with_problems(["recipe=digits_vit"])
    assert cfg.policies.early_stopping.mode == "max"
def _blocks(path: Path) -> list[str]:
    """Top-level keys of a conf file, with their values, one text per key (comments dropped)."""
    body = yaml.safe_load(path.read_text()) or {}
    return [json.dumps({k: v}, sort_keys=True) for k, v in body.items() if k not in ("defaults", "_target_")]


def test_no_two_conf_files_repeat_a_block():
    """The accounting settings live in one node (conf/carbon/accounting), compression stages in one file
    each: no key with a nested block, or group of 4+ leaves, is pasted into two files."""
    seen: dict[str, Path] = {}
    repeated = []
    for path in sorted(conf_dir().rglob("*.yaml")):
        for block in _blocks(path):
            value = json.loads(block)
            (key, inner), = value.items()
            if not isinstance(inner, dict) or len(json.dumps(inner)) < 60:
                continue
            if block in seen:
                repeated.append(f"{key}: {seen[block].relative_to(conf_dir())} and {path.relative_to(conf_dir())}")
            seen.setdefault(block, path)
    assert not repeated, repeated
    carbon = sorted(p.name for p in (conf_dir() / "carbon").glob("*.yaml"))
    for name in carbon:  # each carbon option composes the one accounting node
        text = (conf_dir() / "carbon" / name).read_text()
        assert "pool:" not in text and "carbon_price_usd_per_t" not in text, name


@pytest.mark.parametrize("module", ["greenstack.models", "greenstack.models.builders"])
def test_checks_follow_the_target_not_its_spelling(module):
    """A node naming the defining module (`models.builders.build_timm`) gets the same domain and task-fit
    checks as the public name: validate resolves the target instead of keeping an alias table."""
    from greenstack.compose import compose_with_problems
    from greenstack.validate import validate_config

    data = module.replace("models", "data")
    cfg, problems = compose_with_problems([f"model._target_={module}.build_timm", "model.name=resnet_typo",
                                           "task=causal_lm", f"data._target_={data}.digits"])
    assert not problems, problems
    keys = {p.key for p in validate_config(cfg)}
    assert {"model.name", "data._target_", "model._target_"} <= keys, keys


def test_declared_constraints_are_all_reported_under_their_config_keys():
    """Constraints live on the parameters (errors.checked); validate lists every broken one with its key,
    also beside a type error in the same node (which stops construction), and construction says the same."""
    from greenstack.compose import compose_with_problems
    from greenstack.errors import ConfigError
    from greenstack.policies.compression.prune import MagnitudePruning
    from greenstack.validate import validate_config

    cfg, problems = compose_with_problems(["compression=l2_prune_qat", "compression.prune.final_sparsity=1.5",
                                           "compression.prune.scope=world", "compression.l2.coefficient=-1",
                                           "compression.export.latency_repeats=0"])
    assert not problems, problems
    found = {p.key: p for p in validate_config(cfg)}
    assert set(found) == {"compression.prune.final_sparsity", "compression.prune.scope", "compression.l2.coefficient",
                          "compression.export.latency_repeats"}, found
    assert "[0, 1)" in found["compression.prune.final_sparsity"].reason
    with pytest.raises(ConfigError) as e:
        MagnitudePruning(final_sparsity=1.5, initial_sparsity=-0.1, scope="world")  # type: ignore[arg-type]
    assert {p.key for p in e.value.problems} == {"compression.prune.final_sparsity",
                                                 "compression.prune.initial_sparsity", "compression.prune.scope"}
    # The constructor's own cross-field checks join the declared ones in the same error.
    with pytest.raises(ConfigError) as e:
        MagnitudePruning(final_sparsity=1.5, start="soon")
    assert {p.key for p in e.value.problems} == {"compression.prune.final_sparsity", "compression.prune.start"}


def test_scheduler_and_data_parallel_constraints_are_declared():
    """Scheduler and DDP settings are checked from their annotations, beside the body's duration parsing."""
    from greenstack.errors import ConfigError
    from greenstack.federated.policy import DataParallel
    from greenstack.policies.scheduler.pause_resume import PauseResume
    from greenstack.policies.scheduler.threshold import Threshold

    with pytest.raises(ConfigError) as e:
        PauseResume(mode="later", safety=0.5, percentile=100, check_every="soon")  # type: ignore[arg-type]
    assert {p.key for p in e.value.problems} == {"scheduler.mode", "scheduler.safety", "scheduler.percentile",
                                                 "scheduler.check_every"}
    with pytest.raises(ConfigError) as e:
        Threshold(threshold_g_per_kwh=0, percentile=25)
    assert [p.key for p in e.value.problems] == ["scheduler.threshold_g_per_kwh"]
    with pytest.raises(ConfigError) as e:
        DataParallel(workers=0, comm_hook="ring", timeout_s=0)  # type: ignore[arg-type]
    assert {p.key for p in e.value.problems} == {"federated.workers", "federated.comm_hook", "federated.timeout_s"}


def test_optimizer_and_lr_schedule_are_components():
    """Any torch optimizer by _target_ (no name switch), the schedule a partial given the run's length;
    the shipped AdamW option builds what the former name switch built."""
    import torch
    from hydra.utils import instantiate

    from greenstack.compose import compose_with_problems
    from greenstack.engine.optim import Optim

    cfg, problems = compose_with_problems(["optim.optimizer._target_=torch.optim.RAdam", "~optim.optimizer.betas",
                                           "optim.lr=0.01", "optim.lr_schedule.kind=linear",
                                           "optim.lr_schedule.warmup_steps=2"])
    assert not problems, problems
    model = torch.nn.Linear(3, 2)
    optimizer, schedule = instantiate(cfg.optim).build(model.parameters(), 10)
    assert isinstance(optimizer, torch.optim.RAdam) and optimizer.param_groups[0]["lr"] == 0.01 * 0.5  # warm-up
    assert [round(f(s), 3) for f in schedule.lr_lambdas for s in (0, 1, 2, 6)] == [0.5, 1.0, 1.0, 0.5]
    cfg, _ = compose_with_problems(["recipe=quickstart"])
    new, new_schedule = instantiate(cfg.optim).build(model.parameters(), 100)
    old, old_schedule = Optim(name="adamw", lr=2e-3, weight_decay=0.05, schedule="cosine").build(model.parameters(), 100)
    assert type(new) is type(old) and new.defaults == old.defaults
    assert [new_schedule.lr_lambdas[0](s) for s in range(100)] == [old_schedule.lr_lambdas[0](s) for s in range(100)]
