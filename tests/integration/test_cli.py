"""The `greenstack` command as a user runs it: contract files, validate, multirun, ls, cp."""

from __future__ import annotations

import csv
import json

import pytest

from tests.conftest import FAST, read_jsonl
from tests.helpers.wandb_reader import find_run_files, read_run

TINY = ["data=synthetic_image", "model.name=resnet10t", "data.num_samples=64", "data.batch_size=16"]


def test_train_writes_the_contract_files_and_a_wandb_run(cli, tmp_path):
    run_dir = tmp_path / "run"
    fast = [o for o in FAST if not o.startswith("tracker")]
    result = cli("train", "recipe=quickstart", *fast, f"hydra.run.dir={run_dir}", "tracker=wandb")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert all("step" in r for r in rows)
    assert any("val/accuracy" in r for r in rows)
    assert "test/accuracy" in rows[-1] or any("test/accuracy" in r for r in rows)
    assert (run_dir / "model.safetensors").is_file()
    summary = json.loads((run_dir / "sustainability.json").read_text())
    assert summary["metrics"]["test/accuracy"]["provenance"] == "measured"
    files = find_run_files(run_dir)
    assert len(files) == 1
    run = read_run(files[0])
    assert run["run_id"] == summary["run_id"]
    logged = [row for row in run["history"] if "train/loss" in row]
    assert [row["_step"] for row in logged] == [1, 2]
    expected = [r["train/loss"] for r in rows if "train/loss" in r]
    assert [row["train/loss"] for row in logged] == pytest.approx(expected)
    assert run["summary"]["test/accuracy"] == pytest.approx(summary["metrics"]["test/accuracy"]["value"])
    assert run["config"]["model"]["name"] == "resnet18" and run["config"]["run_name"] == "quickstart"
    # sustainability metrics: labelled in the summary, step-aligned in W&B, CodeCarbon-style CSV
    figures = summary["metrics"]
    for key in ("carbon/total_kg_co2e", "carbon/intensity_g_per_kwh", "carbon/renewable_percent",
                "carbon/per_epoch_kg", "energy/total_kwh", "energy/cpu_kwh", "energy/j_per_sample",
                "efficiency/gpu_utilization", "efficiency/memory_efficiency", "efficiency/flops_per_watt",
                "efficiency/model_size_mb", "efficiency/inference_latency_ms", "cost/energy_usd"):
        assert key in figures, key
        assert figures[key]["provenance"] in ("measured", "estimated", "fallback") and figures[key]["source"]
    assert figures["carbon/total_kg_co2e"]["value"] > 0
    assert "electricitymaps:DE-LU" in figures["carbon/total_kg_co2e"]["source"]
    assert figures["carbon/total_kg_co2e"]["provenance"] != "measured"  # no hardware counter here
    # the intensity itself is the shipped trace replayed onto today's date: estimated, whatever the meter
    assert figures["carbon/intensity_g_per_kwh"]["provenance"] == "estimated"
    assert "replayed" in figures["carbon/intensity_g_per_kwh"]["source"]
    stepped = [row for row in run["history"] if "carbon/total_kg_co2e" in row]
    assert stepped and all(row["_step"] >= 1 for row in stepped)
    assert [r["carbon/total_kg_co2e"] for r in stepped] == sorted(r["carbon/total_kg_co2e"] for r in stepped)
    assert run["summary"]["carbon/total_kg_co2e"] == pytest.approx(figures["carbon/total_kg_co2e"]["value"])
    assert run["summary"]["energy/total_kwh"] == pytest.approx(figures["energy/total_kwh"]["value"])
    rows = list(csv.DictReader((run_dir / "emissions.csv").open()))
    assert len(rows) == 1
    for column in ("timestamp", "project_name", "run_id", "duration", "emissions", "emissions_rate", "cpu_power",
                   "gpu_power", "ram_power", "cpu_energy", "gpu_energy", "ram_energy", "energy_consumed",
                   "country_iso_code", "region"):
        assert column in rows[0]
    assert float(rows[0]["emissions"]) == pytest.approx(figures["carbon/total_kg_co2e"]["value"])
    assert rows[0]["run_id"] == summary["run_id"] and rows[0]["region"] == "DE-LU"
    assert rows[0]["country_iso_code"] == "DEU"
    # the audit log's final head is anchored in sustainability.json and the W&B summary (issue 22.1)
    audit_lines = (run_dir / "audit.jsonl").read_text().splitlines()
    anchor = json.loads((run_dir / "sustainability.json").read_text())["audit"]
    assert anchor["seq"] == len(audit_lines) and anchor["hash"] == json.loads(audit_lines[-1])["hash"]
    assert run["summary"]["audit/head_seq"] == anchor["seq"] and run["summary"]["audit/head_hash"] == anchor["hash"]
    verified = cli("audit", "verify", str(run_dir), "--json")
    assert verified.returncode == 0, verified.stdout
    checked = json.loads(verified.stdout)["anchors_checked"]
    assert "sustainability.json" in checked and any(a.endswith(".wandb") for a in checked), checked


def test_validate_reports_three_mistakes_of_a_user_recipe_at_once(cli, tmp_path):
    recipes = tmp_path / "my_recipes"
    recipes.mkdir()
    (recipes / "broken.yaml").write_text(
        "# @package _global_\nmodel:\n  name: resnet19\noptim:\n  lr: -0.1\ntrainer:\n  max_duration: 3 epochs\n")
    result = cli("validate", "recipe=broken", env={"GREENSTACK_RECIPE_PATH": str(recipes)})
    assert result.returncode == 2, result.stdout + result.stderr
    out = result.stdout + result.stderr
    assert "3 problems" in out
    for key, hint in (("model.name", "resnet18"), ("optim.lr", "positive"), ("trainer.max_duration", "epochs")):
        assert key in out and hint in out
    assert "Traceback" not in out


def test_validate_valid_config_and_unknown_option(cli):
    ok = cli("validate")
    assert ok.returncode == 0, ok.stderr
    bad = cli("validate", "model=timmm", "tracker=wandbb")
    assert bad.returncode == 2
    out = bad.stdout + bad.stderr
    assert "did you mean timm" in out and "did you mean wandb" in out and "valid options" in out


def test_invalid_train_leaves_no_run_dir(cli, tmp_path):
    run_dir = tmp_path / "never"
    result = cli("train", "data=image_folder", f"data.root={tmp_path / 'nope'}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2
    assert "directory does not exist" in result.stdout + result.stderr
    assert not run_dir.exists()
    assert "Traceback" not in result.stderr


def test_multirun_separate_dirs_and_wandb_runs(cli, tmp_path):
    sweep = tmp_path / "sweep"
    fast = [o for o in FAST if not o.startswith("tracker")]
    result = cli("train", "-m", "optim.lr=1e-3,3e-3", *TINY, *fast, f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    ids = set()
    for job in jobs:
        assert (job / "metrics.jsonl").is_file()
        files = find_run_files(job)
        assert len(files) == 1
        ids.add(read_run(files[0])["run_id"])
    assert len(ids) == 2


def test_failing_job_makes_multirun_exit_nonzero(cli, tmp_path, text_csv_file):
    broken = tmp_path / "broken.csv"
    broken.write_text("text,label\nhello world,a\n,b\n")  # header fine (passes validate), row 3 empty
    result = cli("train", "-m", "data=text_csv", f"data.path={text_csv_file},{broken}", "model=bert_tiny",
                 "data.batch_size=8", *FAST, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.returncode != 0
    assert "row 3" in result.stdout + result.stderr
    assert (tmp_path / "sweep" / "0" / "model.safetensors").is_file()  # the good job still ran


def test_ls_and_cp(cli, tmp_path):
    listing = cli("ls")
    assert listing.returncode == 0
    assert "quickstart" in listing.stdout and "greenstack-recipes" in listing.stdout
    assert "resnet" not in listing.stderr
    copied = cli("cp", "recipe/quickstart", "mine.yaml")
    assert copied.returncode == 0, copied.stderr
    text = (tmp_path / "mine.yaml").read_text()
    assert text.startswith("# @package _global_")
    again = cli("cp", "recipe/quickstart", "mine.yaml")
    assert again.returncode == 2 and "--force" in again.stdout + again.stderr
    missing = cli("cp", "recipe/quickstrat", "x.yaml")
    assert missing.returncode == 2 and "quickstart" in missing.stdout + missing.stderr
    # the copy is found through GREENSTACK_RECIPE_PATH and shadows nothing else
    shown = cli("ls", "recipe", env={"GREENSTACK_RECIPE_PATH": str(tmp_path)})
    assert "mine" in shown.stdout and "GREENSTACK_RECIPE_PATH" in shown.stdout


def test_unknown_command_suggests(cli):
    result = cli("trian")
    assert result.returncode == 2 and "did you mean 'train'" in result.stderr


def test_user_recipe_repo_through_hydra_searchpath(cli, tmp_path):
    repo = tmp_path / "team_recipes"
    (repo / "recipe").mkdir(parents=True)
    (repo / "recipe" / "team.yaml").write_text("# @package _global_\nrun_name: team\noptim:\n  lr: 0.5\n")
    ok = cli("train", f"hydra.searchpath=[file://{repo}]", "recipe=team", "--cfg", "job")
    assert ok.returncode == 0, ok.stderr
    assert "run_name: team" in ok.stdout and "lr: 0.5" in ok.stdout
    typo = cli("validate", f"hydra.searchpath=[file://{repo}]", "recipe=taem")
    assert typo.returncode == 2 and "did you mean team" in typo.stdout + typo.stderr


def test_doctor_says_what_is_measured_and_what_is_estimated(cli):
    result = cli("doctor", "--json", "--zone", "GB")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    cpu = [m for m in report["meters"] if "cpu" in m["components"]]
    assert len(cpu) == 1
    if cpu[0]["name"] == "tdp":  # no RAPL here: the estimate is announced, with the reason RAPL is not used
        assert cpu[0]["source"] in report["estimated"]
        assert any(reason.startswith("rapl") for reason in report["not_used"])
    assert report["carbon"]["ok"] and "GB" in report["carbon"]["source"]
    assert len(report["embedded_zones"]) == 12 and report["country_averages"] == 213
    bad = cli("doctor", "--zone", "DE-LUX")
    assert bad.returncode == 0 and "DE-LU" in bad.stdout
