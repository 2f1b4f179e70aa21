"""Secrets given in a config are used in memory and never reach a file of the run (issue 22.2)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from greenstack.checkpoint.store import Store
from greenstack.secrets import hide_override_secrets, is_secret_key, redact, scrub_hydra_dir
from tests.conftest import FAST

ENDPOINT = os.environ.get("GREENSTACK_TEST_S3_ENDPOINT")
KEY = os.environ.get("GREENSTACK_TEST_S3_KEY", "testkey")
SECRET = os.environ.get("GREENSTACK_TEST_S3_SECRET", "testsecret")


def _files_containing(root: Path, needles: list[str]) -> list[str]:
    """Every file below root (recursively, binary too) holding any of the needles."""
    hits = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            hits += [f"{path.relative_to(root)}: {n}" for n in needles if n.encode() in data]
    return hits


@pytest.mark.s3
@pytest.mark.slow
def test_s3_keys_in_storage_options_are_used_but_never_written(cli, tmp_path):
    if not ENDPOINT:
        if os.environ.get("CI"):
            pytest.fail("CI must start the S3 server and set GREENSTACK_TEST_S3_ENDPOINT")
        pytest.skip("no S3 server: run tests/infra/s3_ceph_rgw.sh and set GREENSTACK_TEST_S3_ENDPOINT")
    run_dir = tmp_path / "run"
    url = f"s3://greenstack-secret-{uuid.uuid4().hex[:8]}/run"
    fast = [o for o in FAST if not o.startswith("tracker")]
    result = cli("train", "data=synthetic_image", "model.name=resnet10t", "data.num_samples=32", "data.batch_size=16",
                 *fast, f"hydra.run.dir={run_dir}", "tracker=wandb", "checkpointing=hierarchical",
                 f"checkpointing.durable_url={url}", "checkpointing.durable_every=1",
                 f"checkpointing.storage_options={{key: {KEY}, secret: {SECRET}, "
                 f"client_kwargs: {{endpoint_url: '{ENDPOINT}'}}, use_listings_cache: false}}")
    assert result.returncode == 0, result.stderr[-3000:]
    options = {"key": KEY, "secret": SECRET, "client_kwargs": {"endpoint_url": ENDPOINT}}
    assert Store(url, options).names()  # the real keys were used: the checkpoint is on S3
    assert (run_dir / ".hydra" / "overrides.yaml").is_file() and list(run_dir.rglob("*.wandb"))
    assert _files_containing(run_dir, [KEY, SECRET]) == []
    assert "${oc.env:GREENSTACK_SECRET_CHECKPOINTING_STORAGE_OPTIONS_SECRET}" in \
        (run_dir / ".hydra" / "config.yaml").read_text()
    assert SECRET not in result.stdout + result.stderr


def test_secrets_written_in_a_yaml_config_are_scrubbed_from_the_hydra_files(tmp_path):
    hydra = tmp_path / ".hydra"
    hydra.mkdir()
    (hydra / "config.yaml").write_text("checkpointing:\n  storage_options:\n    key: AKIAFILEKEY0001\n"
                                       "    secret: file-secret-value\n    anon: false\n  key_env: MY_KEY\n"
                                       "tracker:\n  api_key: ${oc.env:WANDB_API_KEY}\n")
    (hydra / "overrides.yaml").write_text("- optim.lr=0.1\n- +tracker.token=tok-123456\n")
    (hydra / "hydra.yaml").write_text("hydra:\n  overrides:\n    task:\n    - +tracker.token=tok-123456\n")
    assert len(scrub_hydra_dir(hydra)) == 3
    assert _files_containing(tmp_path, ["AKIAFILEKEY0001", "file-secret-value", "tok-123456"]) == []
    text = (hydra / "config.yaml").read_text()
    assert "key_env: MY_KEY" in text and "${oc.env:WANDB_API_KEY}" in text and "anon: false" in text
    assert "optim.lr=0.1" in (hydra / "overrides.yaml").read_text()


def test_secret_key_names_overrides_and_redaction():
    assert all(is_secret_key(k) for k in ("key", "secret", "token", "password", "aws_secret_access_key",
                                          "api_key", "AWS_SESSION_TOKEN", "client_secret", "my_key"))
    assert not any(is_secret_key(k) for k in ("key_env", "key_file", "tokenizer", "endpoint_url", "monkey"))
    env: dict[str, str] = {}
    argv = hide_override_secrets(["optim.lr=0.1", "-m", "+x.password='p a s s'", "y.storage_options={secret: 42}"],
                                 env)
    assert argv[:2] == ["optim.lr=0.1", "-m"]
    assert argv[2] == "+x.password='${oc.env:GREENSTACK_SECRET_X_PASSWORD}'"
    assert env == {"GREENSTACK_SECRET_X_PASSWORD": "p a s s", "GREENSTACK_SECRET_Y_STORAGE_OPTIONS_SECRET": "42"}
    assert redact({"a": [{"token": "t"}], "key": None, "secret": "${oc.env:S}"}) == \
        {"a": [{"token": "***"}], "key": None, "secret": "${oc.env:S}"}
