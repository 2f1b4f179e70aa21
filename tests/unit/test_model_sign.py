from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_model

from greenstack.cli import main
from greenstack.errors import DataError
from greenstack.models.signing import sign_model, verify_model


@pytest.fixture
def run_dir(tmp_path):
    save_model(torch.nn.Linear(4, 2), str(tmp_path / "model.safetensors"))
    return tmp_path


def test_sign_verify_and_detect_tampering(run_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OWNER_SECRET", "s3cret")
    assert main(["model", "keygen", str(tmp_path / "keys" / "k")]) == 0
    key, pub = tmp_path / "keys" / "k", tmp_path / "keys" / "k.pub"
    sign_model(run_dir, key, owner="acme", owner_key_env="OWNER_SECRET")
    manifest = verify_model(run_dir, pub, owner_key_env="OWNER_SECRET")
    assert manifest["owner"] == "acme" and len(manifest["fingerprint"]) == 64
    assert main(["model", "verify", str(run_dir), "--pub", str(pub), "--owner-key-env", "OWNER_SECRET"]) == 0
    assert "signature valid, owner acme" in capsys.readouterr().out

    monkeypatch.setenv("OWNER_SECRET", "guess")
    with pytest.raises(DataError, match="fingerprint does not match"):
        verify_model(run_dir, pub, owner_key_env="OWNER_SECRET")

    weights = run_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match="do not match the signed manifest"):
        verify_model(run_dir, pub)
    assert main(["model", "verify", str(run_dir), "--pub", str(pub)]) == 2


def test_edited_manifest_breaks_the_signature(run_dir, tmp_path):
    from greenstack.carbon.integrity import generate_keypair

    key, pub = generate_keypair(tmp_path / "k")
    manifest_path = sign_model(run_dir, key, owner="acme")
    manifest = json.loads(manifest_path.read_text())
    manifest["owner"] = "mallory"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError):
        verify_model(run_dir, pub)
