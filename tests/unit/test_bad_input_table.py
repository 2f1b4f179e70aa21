"""Bad input, table-driven and property-based: every row exits 2 with one clear line naming the key (or
file/line), no traceback, and no run dir created (issue 22 items 5, 8, 9). In-process CLI calls keep it fast."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from greenstack.cli import main


def _run(capsys, *argv: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _assert_clear(code: int, out: str, key: str) -> None:
    lines = [line for line in out.splitlines() if line.strip()]
    assert code == 2, out
    assert "Traceback" not in out and "HYDRA_FULL_ERROR" not in out, out
    assert len(lines) == 1, out  # one clear line
    assert key in lines[0], out


#: (overrides, key the message must name)
TRAIN_ROWS = [
    (["data.batch_size=0"], "data.batch_size"),
    (["data.batch_size=-4"], "data.batch_size"),
    (["data.image_size=0"], "data.image_size"),
    (["data.image_size=-32"], "data.image_size"),
    (["data.val_fraction=1.5"], "data.val_fraction"),
    (["data.test_fraction=-0.1"], "data.test_fraction"),
    (["data.num_workers=-1"], "data.num_workers"),
    (["data=synthetic_image", "data.num_classes=1"], "data.num_classes"),
    (["data=synthetic_image", "data.num_samples=0"], "data.num_samples"),
    (["trainer.max_duration=0ba"], "trainer.max_duration"),
    (["trainer.max_duration=0ep"], "trainer.max_duration"),
    (["trainer.device=cuda:99"], "trainer.device"),  # no such device on a CPU machine or a GPU one
    (["optim.lr=inf"], "optim.lr"),
    (["optim.lr=nan"], "optim.lr"),
    (["optim.lr=-1"], "optim.lr"),
    (["optim.optimizer.betas=[2.0,3.0]"], "optim.optimizer.betas"),  # torch's own check, run by validate
    (["optim.optimizer.betas=[0.9]"], "optim.optimizer"),
    (["optim.weight_decay=-1"], "optim.weight_decay"),
    (["optim=sgd", "optim.optimizer.momentum=-0.5"], "optim.optimizer.momentum"),
    (["optim.lr_schedule.warmup_steps=-1"], "optim.lr_schedule.warmup_steps"),
    (["carbon.electricity_usd_per_kwh=nan"], "carbon.electricity_usd_per_kwh"),
    (["carbon.embodied_kg_co2e=nan"], "carbon.embodied_kg_co2e"),
    (["carbon.pue=inf"], "carbon.pue"),
    (["carbon.budget_kg=-inf"], "carbon.budget_kg"),
    (["trainer.max_grad_norm=nan"], "trainer.max_grad_norm"),
]


@pytest.mark.parametrize(("overrides", "key"), TRAIN_ROWS, ids=[" ".join(r[0]) for r in TRAIN_ROWS])
def test_bad_training_config_is_one_line_exit_2_and_no_run_dir(capsys, tmp_path, overrides, key):
    run_dir = tmp_path / "run"
    code, out = _run(capsys, "train", *overrides, f"hydra.run.dir={run_dir}", "tracker=none")
    _assert_clear(code, out, key)
    assert not run_dir.exists()


def _image_root(tmp_path, damage):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 60, 0, 0)).save(tmp_path / "imgs" / c / f"{i}.png")
    bad = tmp_path / "imgs" / "a" / "1.png"
    bad.write_bytes(damage(bad.read_bytes()))
    return tmp_path / "imgs"


@pytest.mark.parametrize("damage", [lambda b: b[: len(b) // 2], lambda b: b"not an image"], ids=["truncated", "garbage"])
def test_unreadable_image_in_an_image_folder_is_caught_before_the_run(capsys, tmp_path, damage):
    root = _image_root(tmp_path, damage)
    run_dir = tmp_path / "run"
    code, out = _run(capsys, "train", "data=image_folder", f"data.root={root}", f"hydra.run.dir={run_dir}")
    _assert_clear(code, out, "data.root")
    assert "1.png" in out and "cannot read image" in out
    assert not run_dir.exists()


@pytest.mark.parametrize(("text", "where"), [("model:\n\tname: resnet18\n", "line 2"), ("model: [a\n", "line 2"),
                                             ("a: b: c\n", "line 1")], ids=["tab", "unclosed", "mapping"])
def test_recipe_that_is_not_yaml_names_its_file_and_line(capsys, tmp_path, monkeypatch, text, where):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "mine.yaml").write_text(text)
    monkeypatch.setenv("GREENSTACK_RECIPE_PATH", str(tmp_path / "recipes"))
    run_dir = tmp_path / "run"
    code, out = _run(capsys, "train", "recipe=mine", f"hydra.run.dir={run_dir}")
    _assert_clear(code, out, "mine.yaml")
    assert where in out and "not valid YAML" in out
    assert not run_dir.exists()


@pytest.fixture
def pool_db(tmp_path, capsys):
    db = tmp_path / "pool.sqlite"
    assert main(["pool", "create", "--db", str(db), "--participant", "a=10"]) == 0
    assert main(["pool", "request", "--db", str(db), "--participant", "a", "--kg", "1", "--no-alternatives"]) == 0
    capsys.readouterr()
    return db


def test_pool_and_audit_inputs_are_one_line_errors(capsys, tmp_path, pool_db):
    (tmp_path / "notdb.txt").write_text("hello\n")
    (tmp_path / "binary.jsonl").write_bytes(b'{"seq": 1}\n\xff\xfe{}\n')
    (tmp_path / "text.jsonl").write_text('{"seq": 1}\nnot json\n')
    rows = [
        (["pool", "request", "--db", str(pool_db), "--participant", "a", "--kg", "1e13"], "--kg"),
        (["pool", "request", "--db", str(pool_db), "--participant", "a", "--kg", "inf"], "--kg"),
        (["pool", "settle", "--db", str(pool_db), "--id", "1", "--kg", "1e13"], "--kg"),
        (["pool", "budget", "--db", str(pool_db), "--participant", "a=1e13"], "--participant"),
        (["pool", "create", "--db", str(tmp_path / "new.sqlite"), "--participant", "a=9.3e12"], "--participant"),
        (["pool", "status", "--db", str(tmp_path)], "--db"),
        (["pool", "status", "--db", str(tmp_path / "notdb.txt")], "--db"),
        (["pool", "status", "--db", str(tmp_path / "missing" / "p.sqlite")], "--db"),
        (["audit", "verify", "--db", str(tmp_path)], "--db"),
        (["audit", "verify", str(tmp_path / "binary.jsonl")], "binary.jsonl:2"),
        (["audit", "show", str(tmp_path / "binary.jsonl")], "binary.jsonl:2"),
        (["audit", "show", str(tmp_path / "text.jsonl")], "text.jsonl:2"),
    ]
    for argv, key in rows:
        code, out = _run(capsys, *argv)
        _assert_clear(code, out, key)
    assert not (tmp_path / "new.sqlite").exists() or (tmp_path / "new.sqlite").stat().st_size == 0


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["optim.lr", "optim.weight_decay", "carbon.pue", "carbon.electricity_usd_per_kwh",
                            "carbon.embodied_kg_co2e", "optim.lr_schedule.min_lr_ratio"]),
       value=st.sampled_from([math.inf, -math.inf, math.nan]))
def test_any_non_finite_number_is_refused_at_validate(capsys, tmp_path, key, value):
    code, out = _run(capsys, "validate", f"{key}={value}")
    _assert_clear(code, out, key)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(key=st.sampled_from(["data.batch_size", "data.image_size", "data.num_workers"]),
       value=st.integers(max_value=-1) | st.just(0))
def test_any_non_positive_size_is_refused_at_validate(capsys, key, value):
    if key == "data.num_workers" and value == 0:
        value = -1
    code, out = _run(capsys, "validate", f"{key}={value}")
    _assert_clear(code, out, key)
