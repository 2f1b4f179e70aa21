"""Resume checks what it resumes: each checkpoint records the training config; a mismatch is refused with
every difference listed unless allowed (issue 22 item 3)."""

from __future__ import annotations

import pytest
import torch

from greenstack.checkpoint.fingerprint import allowed, differences, training_config
from greenstack.engine.loop import Trainer, TrainerConfig
from greenstack.engine.optim import Optim
from greenstack.errors import ConfigError
from greenstack.policies.checkpointing.hierarchical import HierarchicalCheckpointing

BASE = {"model.name": "mlp", "model.hidden": 8, "optim.lr": 0.1, "optim.name": "adamw", "seed": 0,
        "trainer.max_duration": "1ep", "data.batch_size": 8}


def _batches():
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    return [{"inputs": x[i:i + 8], "labels": (x[i:i + 8, 0] > 0).long()} for i in range(0, 32, 8)]


def _fit(tmp_path, config, *, hidden=8, lr=0.1, resume="never", allow=None, max_duration="1ep"):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 2))
    policy = HierarchicalCheckpointing(memory_every=1, local_every=1, local_dir=str(tmp_path), resume=resume,
                                       resume_allow_changes=allow)
    policy.bind_run_config(config)
    trainer = Trainer(model, _batches(), Optim(lr=lr, schedule="linear"),
                      TrainerConfig(max_duration=max_duration, progress=False), policies=[policy], batch_size=8)
    trainer.fit()
    return trainer, policy


def test_resume_refuses_other_training_listing_every_difference(tmp_path):
    _fit(tmp_path, BASE, max_duration="2ba")
    other = {**BASE, "optim.lr": 0.01, "model.name": "bigger", "model.hidden": 16}
    with pytest.raises(ConfigError) as err:  # not a load_state_dict size-mismatch traceback
        _fit(tmp_path, other, hidden=16, lr=0.01, resume="auto")
    keys = {p.key for p in err.value.problems}
    assert keys == {"optim.lr", "model.name", "model.hidden"}
    text = str(err.value)
    assert "0.1" in text and "resume_allow_changes=[" in text and err.value.exit_code == 2


def test_allowed_changes_resume_and_a_new_lr_takes_effect(tmp_path):
    _fit(tmp_path, BASE, max_duration="2ba")
    trainer, policy = _fit(tmp_path, {**BASE, "optim.lr": 0.01}, lr=0.01, resume="auto", allow=["optim.lr"],
                           max_duration="3ba")
    assert policy.resumed_from and policy.resumed_from.endswith("step-000000002")
    assert trainer.state.step == 3
    # linear schedule over 3 steps, one step after the resume at step 2: base 0.01, not the checkpoint's 0.1
    assert trainer.state.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.01)
    assert trainer.state.optimizer.param_groups[0]["lr"] < 0.01


def test_same_config_resumes_and_old_checkpoints_without_a_config_still_load(tmp_path):
    _fit(tmp_path, BASE, max_duration="2ba")
    _, policy = _fit(tmp_path, BASE, resume="auto", max_duration="2ba")
    assert policy.resumed_from
    legacy = tmp_path / "legacy"
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    old = HierarchicalCheckpointing(memory_every=1, local_every=1, local_dir=str(legacy))  # no bound config
    Trainer(model, _batches(), Optim(lr=0.1), TrainerConfig(max_duration="2ba", progress=False), policies=[old],
            batch_size=8).fit()
    _, policy = _fit(legacy, BASE, resume="auto", max_duration="2ba")
    assert policy.resumed_from


def test_training_config_covers_what_determines_training_and_nothing_else():
    from greenstack.compose import compose_with_problems

    cfg, problems = compose_with_problems(["optim.lr=0.01", "trainer.progress=false"])
    assert not problems
    flat = training_config(cfg)
    assert flat["optim.lr"] == 0.01 and "model.name" in flat and flat["seed"] == 0 and "data.batch_size" in flat
    assert "trainer.max_duration" in flat and "optim.lr_schedule.kind" in flat
    assert not any(k.startswith(("trainer.progress", "tracker", "carbon", "energy", "checkpointing")) for k in flat)
    assert differences({"a": 1, "b": 2}, {"a": 1, "c": 3}) == [("b", 2, "<absent>"), ("c", "<absent>", 3)]
    assert allowed("optim.lr", ["optim"]) and allowed("optim.lr", ["optim.*"]) and not allowed("optim.lr", ["model"])


@pytest.mark.slow
def test_cli_resume_with_another_lr_or_model_is_a_clear_refusal(tmp_path, capsys):
    from greenstack.cli import main

    run = ["data=synthetic_image", "data.num_samples=32", "data.batch_size=16", "data.image_size=16",
           "model.name=resnet10t", "trainer.max_duration=2ba", "trainer.progress=false", "tracker=none",
           "checkpointing=hierarchical", "checkpointing.local_every=1", "energy.interval_s=0.2",
           f"hydra.run.dir={tmp_path / 'run'}"]
    assert main(["train", *run]) == 0
    capsys.readouterr()
    for change, key in (("optim.lr=0.01", "optim.lr"), ("model.name=resnet18", "model.name")):
        code = main(["train", *run, change, "checkpointing.resume=auto"])
        out = capsys.readouterr()
        text = out.out + out.err
        assert code == 2 and key in text and "resume_allow_changes" in text, text
        assert "Traceback" not in text and "load_state_dict" not in text and "HYDRA_FULL_ERROR" not in text
    code = main(["train", *run, "optim.lr=0.01", "trainer.max_duration=3ba", "checkpointing.resume=auto",
                 "checkpointing.resume_allow_changes=[optim.lr,trainer.max_duration]"])
    assert code == 0, capsys.readouterr().err[-2000:]
