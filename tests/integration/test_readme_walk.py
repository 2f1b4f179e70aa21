"""Walk the README's own command lines (every fenced ```bash block) against the installed package.

Each line is checked the cheapest way that still fails when the line stops working:
* `greenstack train ...`: `greenstack validate` with the same overrides (and env prefix, and -m);
* `greenstack plan forecast-eval|backtest ...`: the real argument parser, then every --trace/--history/
  --weather file loaded as the command would (the full evaluation takes minutes);
* `greenstack carbon weather ...` (network) and `plan start ... --exec` (waits hours): the real parser;
* `greenstack cp|ls|doctor|report|pool|audit|plan region ...`: run for real;
* `tox -e NAME`: NAME is an environment of tox.ini; `python -m benchmarks.X`: the module exists;
* `srun ... torchrun ... -m greenstack train ...`: the greenstack part, validated.
Files the README tells the user to bring (reviews.csv, ~/photos, a team repo, run dirs, their own traces)
are fabricated in the working directory first (`user_files`); placeholders such as /path/to/team-repo
are pointed there. A command word this test does not know fails it: new README commands need a rule.
"""

from __future__ import annotations

import configparser
import importlib.util
import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from greenstack import cli
from tests.conftest import REPO

README = REPO / "README.md"
RUNS = REPO / "tests" / "fixtures" / "runs"
SWEEP_DIR = "multirun/2026-11-29/10-00-00"


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks (continuations joined, comments dropped)."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S):
        current = ""
        for raw in block.splitlines():
            if not current and raw.strip().startswith("#"):
                continue
            current += raw.rstrip().removesuffix("\\") + " "
            if not raw.rstrip().endswith("\\"):
                if current.strip():
                    lines.append(current.strip())
                current = ""
    return lines


def _hourly(start: str, hours: int, seed: int) -> pd.DataFrame:
    times = pd.date_range(start, periods=hours, freq="h", tz="UTC")
    rng = np.random.default_rng(seed)
    daily = 250 + 80 * np.sin(2 * np.pi * times.hour / 24)
    return pd.DataFrame({"timestamp": times.strftime("%Y-%m-%dT%H:%M:%SZ"),
                         "carbon_intensity": np.round(daily + rng.normal(0, 10, hours), 2)})


def user_files(cwd: Path, home: Path) -> None:
    """What the README's lines assume the user has (their data, repos, earlier runs, exported traces)."""
    from greenstack.data.builders import synthetic_text_rows

    texts, labels = synthetic_text_rows(32, 2, seed=0)
    pd.DataFrame({"body": texts, "label": labels}).to_csv(cwd / "reviews.csv", index=False)
    (cwd / "corpus").mkdir()  # a language-model corpus (data=hf_local, jsonl with a `text` column)
    pd.DataFrame({"text": texts}).to_json(cwd / "corpus" / "part-0.jsonl", orient="records", lines=True)
    pd.DataFrame({"body": texts, "stars": [1 + i % 5 for i in range(len(texts))]}).to_parquet(cwd / "reviews.parquet")
    from PIL import Image

    for cls in ("cats", "dogs"):
        (home / "photos" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(home / "photos" / cls / f"{i}.png")
    (cwd / "team-repo" / "recipe").mkdir(parents=True)
    (cwd / "team-repo" / "recipe" / "team_baseline.yaml").write_text(
        "# @package _global_\nrun_name: team_baseline\noptim:\n  lr: 1.0e-3\n")
    (cwd / "runs").mkdir()
    shutil.copytree(RUNS / "small", cwd / "runs" / "a")
    shutil.copytree(RUNS / "baseline", cwd / "runs" / "baseline")
    shutil.copytree(RUNS / "sweep", cwd / SWEEP_DIR)
    _hourly("2024-01-01", 24 * 182, 1).to_csv(cwd / "GB_2024H1.csv", index=False)   # an Electricity Maps export
    _hourly("2024-05-01", 24 * 90, 2).to_csv(cwd / "gb_live.csv", index=False)
    weather = _hourly("2024-01-01", 24 * 182, 3).rename(columns={"carbon_intensity": "weather_wind_speed_10m_d1"})
    weather.to_csv(cwd / "gb_weather.csv", index=False)                              # `carbon weather` output
    dacf = pd.read_csv(REPO / "benchmarks" / "data" / "dacf" / "DACF-ERCO_2020-01_2021-06_hourly.csv.gz")
    half = len(dacf) // 2  # the DACF archive's files, as the user downloads them
    dacf.iloc[:half].to_csv(cwd / "DACF-ERCO_2020-01_2021-06_hourly.csv", index=False)
    dacf.iloc[half:].to_csv(cwd / "DACF-ERCO_2021-07_2021-12_hourly.csv", index=False)


def _tox_envs() -> set[str]:
    parser = configparser.ConfigParser()
    parser.read(REPO / "tox.ini")
    return {"py", *(s.split(":", 1)[1] for s in parser.sections() if s.startswith("testenv:"))}


def _run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out + out.err


def _check_plan_files(argv: list[str]) -> None:
    from greenstack.carbon import inputs
    from greenstack.cli import plan

    args = plan.build_parser().parse_args(argv)
    for role in ("trace", "history"):
        for path in getattr(args, role, None) or []:
            inputs.load_trace(path, args.units, role)
    inputs.load_weather(getattr(args, "weather", []) or [], [])


def check_line(line: str, cwd: Path, capsys, monkeypatch) -> str:
    """Check one README line; returns how it was checked. Raises AssertionError naming the line."""
    words = shlex.split(line.replace("/path/to/team-repo", str(cwd / "team-repo")), comments=True)
    if "&&" in words:  # `pip install ... && tox -e NAME`
        words = words[words.index("&&") + 1:]
    import os

    # as bash does: ~ at the start of a word or after `=` (data.root=~/photos) is the home directory
    words = [re.sub(r"(^|=)~(?=/|$)", lambda m: m.group(1) + os.environ["HOME"], w) for w in words]
    env = {}
    while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        env[key] = value
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if words[0] == "srun":  # the greenstack command inside an allocation
        words = ["greenstack", *words[words.index("greenstack") + 1:]]
    if words[:2] == ["tox", "-e"]:
        assert words[2] in _tox_envs(), f"tox.ini has no environment {words[2]!r}: {line}"
        return "tox env"
    if words[:2] == ["python", "-m"] and words[2].startswith("benchmarks."):
        assert importlib.util.find_spec(words[2]) is not None, line
        return "module"
    assert words[0] == "greenstack", f"no rule for this README command: {line}"
    command, rest = words[1], words[2:]
    if command == "train":
        code, out = _run(["validate", *rest], capsys)
        assert code == 0, f"{line}\n{out[-3000:]}"
        return "validate"
    if command == "plan" and rest[0] in ("forecast-eval", "backtest"):
        _check_plan_files(rest)
        return "parse+load"
    if command == "plan" and rest[0] == "start":  # waits for a low-carbon window, then execs the user's script
        from greenstack.cli import plan

        args = plan.build_parser().parse_args(rest)
        assert args.duration and args.deadline, line
        return "parse"
    if command == "carbon" and rest[0] == "weather":
        from greenstack.cli.carbon import build_parser

        build_parser().parse_args(rest)
        return "parse"
    code, out = _run(words[1:], capsys)
    assert code == 0, f"{line}\nexit {code}\n{out[-3000:]}"
    return "run"


@pytest.mark.slow
def test_every_readme_command_works_as_written(tmp_path, capsys, monkeypatch):
    cwd, home = tmp_path / "work", tmp_path / "home"
    cwd.mkdir()
    home.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    for var in ("GREENSTACK_RECIPE_PATH", "GREENSTACK_POOL_DB"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GREENSTACK_START_NOW", "1")  # a line that would wait for a carbon window must not
    user_files(cwd, home)
    commands = readme_commands()
    assert len(commands) >= 25 and any(c.startswith("greenstack cp") for c in commands)
    how = {}
    for line in commands:
        with monkeypatch.context() as m:
            how[line] = check_line(line, cwd, capsys, m)
    assert (cwd / "recipes-mine" / "quickstart.yaml").is_file()  # `cp` into a new directory
    assert sorted(set(how.values())) == ["module", "parse", "parse+load", "run", "tox env", "validate"]


def test_readme_points_to_environments_tox_creates():
    text = README.read_text(encoding="utf-8")
    for name in re.findall(r"\.tox/([\w-]+)/bin/greenstack", text):
        assert name in _tox_envs(), f"README points to .tox/{name}, which tox.ini does not create"


def test_a_broken_line_fails_the_walk(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AssertionError, match="optim=adamm"):
        check_line("greenstack train recipe=quickstart optim=adamm", tmp_path, capsys, monkeypatch)
    with pytest.raises(AssertionError, match="no rule"):
        check_line("frobnicate --now", tmp_path, capsys, monkeypatch)
    with pytest.raises(AssertionError, match="no environment"):
        check_line("tox -e quickstrat", tmp_path, capsys, monkeypatch)
