"""First-hour usability of the `greenstack` command (issue 15): help that exits 0, every subcommand in
the top-level help, plurals, tables that do not wrap when piped, `cp` into a new directory, a recipe
path that is checked, and searchpath repos whose recipes shadow the packaged ones."""

from __future__ import annotations

import re

import pytest

from greenstack import cli as cli_module


def test_help_of_every_command_exits_zero_and_top_level_lists_every_subcommand(cli):
    from greenstack.cli.carbon import build_parser

    for command in ("ls", "validate"):
        result = cli(command, "--help")
        assert result.returncode == 0, (command, result.stdout + result.stderr)
        assert f"usage: greenstack {command}" in result.stdout
    top = cli("--help")
    assert top.returncode == 0
    for command in cli_module.COMMANDS:
        assert re.search(rf"^  {command}\b", top.stdout, re.M), command
    carbon_lines = " ".join(line for line in top.stdout.splitlines() if line.startswith("  carbon"))
    subparsers = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    for sub in subparsers.choices:  # keygen, sign, verify, check, weather
        assert re.search(rf"\b{sub}\b", carbon_lines), sub


def test_counts_are_singular_for_one(cli, tmp_path):
    from tests.integration.test_report import RUNS

    result = cli("validate", "optim=adamm")
    assert result.returncode == 2
    assert "1 problems" not in result.stdout + result.stderr
    compared = cli("report", "compare", str(RUNS / "small"), "--plot", str(tmp_path / "p.png"))
    assert compared.returncode == 0, compared.stderr
    assert "1 run:" in compared.stdout and "1 runs" not in compared.stdout
    from greenstack.console import plural

    assert [plural(n, "problem") for n in (0, 1, 2)] == ["0 problems", "1 problem", "2 problems"]
    assert plural(1, "entry") == "1 entry" and plural(3, "entry") == "3 entries" and plural(2, "key") == "2 keys"


def test_piped_tables_do_not_wrap_long_paths(cli, tmp_path):
    deep = tmp_path / ("a-rather-long-directory-name-" * 3) / "recipes-of-the-team"
    deep.mkdir(parents=True)
    (deep / "mine.yaml").write_text("# @package _global_\nrun_name: mine\n")
    result = cli("ls", "recipe", env={"GREENSTACK_RECIPE_PATH": str(deep), "COLUMNS": ""})
    assert result.returncode == 0, result.stderr
    assert len(str(deep / "mine.yaml")) > 80
    assert str(deep / "mine.yaml") in result.stdout  # on one line, not folded at 80 columns


def test_cp_into_a_new_directory_and_its_hint_work(cli, tmp_path):
    copied = cli("cp", "recipe/quickstart", "recipes-mine/")
    assert copied.returncode == 0, copied.stdout + copied.stderr
    assert (tmp_path / "recipes-mine").is_dir()
    assert (tmp_path / "recipes-mine" / "quickstart.yaml").read_text().startswith("# @package _global_")
    assert "GREENSTACK_RECIPE_PATH=recipes-mine greenstack train recipe=quickstart" in copied.stdout
    (tmp_path / "recipes-mine" / "quickstart.yaml").write_text("# @package _global_\nrun_name: mine\n")
    env = {"GREENSTACK_RECIPE_PATH": "recipes-mine"}
    listing = cli("ls", "recipe", env=env)
    row = next(line for line in listing.stdout.splitlines() if "quickstart" in line and "shadowed" not in line)
    assert "GREENSTACK_RECIPE_PATH" in row and "recipes-mine" in row
    job = cli("train", "recipe=quickstart", "--cfg", "job", env=env)
    assert job.returncode == 0 and "run_name: mine" in job.stdout
    # a file name without .yaml and no existing dir is a directory too; a nested one is created
    assert cli("cp", "recipe/digits_vit", "more/nested").returncode == 0
    assert (tmp_path / "more" / "nested" / "digits_vit.yaml").is_file()


def test_a_recipe_path_that_is_missing_or_a_file_is_an_error(cli, tmp_path):
    (tmp_path / "afile").write_text("x")
    for value, reason in (("nope", "does not exist"), ("afile", "is a file")):
        for args in (("train", "recipe=quickstart"), ("validate", "recipe=quickstart"), ("ls",)):
            result = cli(*args, env={"GREENSTACK_RECIPE_PATH": value})
            out = result.stdout + result.stderr
            assert result.returncode == 2, (args, value, out)
            assert "GREENSTACK_RECIPE_PATH" in out and reason in out and "Traceback" not in out
    assert not (tmp_path / "outputs").exists()


def test_a_searchpath_repo_recipe_shadows_the_packaged_one_and_ls_shows_it(cli, tmp_path):
    repo = tmp_path / "team"
    (repo / "recipe").mkdir(parents=True)
    (repo / "recipe" / "quickstart.yaml").write_text("# @package _global_\nrun_name: team_quickstart\n")
    searchpath = f"hydra.searchpath=[file://{repo}]"
    job = cli("train", searchpath, "recipe=quickstart", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert "run_name: team_quickstart" in job.stdout
    listing = cli("ls", "recipe", searchpath)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    rows = [line for line in listing.stdout.splitlines() if "quickstart" in line]
    assert "hydra.searchpath" in rows[0] and str(repo / "recipe" / "quickstart.yaml") in rows[0]
    assert "(shadowed)" in rows[1] and "greenstack-recipes" in rows[1]
    assert len(rows) == 2
    everything = cli("ls", searchpath)
    assert everything.returncode == 0 and "hydra.searchpath" in everything.stdout


@pytest.mark.slow
def test_redirected_training_output_shows_plain_progress_and_the_steps_after_training(cli, tmp_path):
    from tests.conftest import FAST

    fast = [o for o in FAST if not o.startswith("trainer.progress")]
    result = cli("train", "data=synthetic_image", "model.name=resnet10t", "data.num_samples=64",
                 "data.batch_size=16", *fast, "trainer.progress=true", "trainer.progress_interval_s=0",
                 f"hydra.run.dir={tmp_path / 'run'}")
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-3000:]
    assert "train: step 1/2" in out and "train: step 2/2 (100 %), epoch" in out  # not a TTY: plain lines
    assert "nan" not in " ".join(line for line in out.splitlines() if "train: step" in line)
    for after in ("evaluating on the test split", "measuring the run's figures", "writing report.html"):
        assert after in out, after
