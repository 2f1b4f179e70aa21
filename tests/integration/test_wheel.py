"""The built wheel carries conf/ and recipes/: install it into a fresh venv and train from /tmp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

from tests.conftest import REPO, _env


@pytest.mark.slow
def test_wheel_installs_into_fresh_venv_and_trains_outside_the_repo(tmp_path):
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                           capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next(dist.glob("greenstack-*.whl"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # the heavy dependencies (torch, timm, ...) come from this interpreter's site-packages, appended
    # after the fresh venv's own, so `greenstack` itself resolves to the wheel just installed
    install = subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "-q", str(wheel)],
                             capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    # (added after the install, or pip would find this environment's greenstack and skip the wheel)
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where = subprocess.check_output([str(py), "-c", "import greenstack, greenstack.paths as p; "
                                     "print(greenstack.__file__); print(p.conf_dir()); print(p.recipes_dir())"],
                                    text=True, cwd=tmp_path).split()
    assert all(str(env_dir) in w for w in where), where
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = _env()
    env.pop("PYTHONPATH", None)
    cmd = [str(env_dir / "bin" / "greenstack"), "train", "data=synthetic_image", "model.name=resnet10t",
           "data.num_samples=64", "trainer.max_duration=2ba", "trainer.progress=false", "tracker=none",
           "hydra.run.dir=out"]
    result = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((workdir / "out" / "sustainability.json").read_text())
    assert summary["metrics"]["train/steps"]["value"] == 2
    listing = subprocess.run([str(env_dir / "bin" / "greenstack"), "ls", "recipe"], cwd=workdir, env=env,
                             capture_output=True, text=True, timeout=120)
    assert "quickstart" in listing.stdout and str(env_dir) in listing.stdout.replace("\n", "")
    assert os.path.isfile(workdir / "out" / "model.safetensors")
