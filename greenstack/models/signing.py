"""Signed model artifacts and an ownership fingerprint (the library behind `greenstack model keygen|sign|verify`).

`sign` writes `model.manifest.json` (sha256 of the weights, run id, owner) and an Ed25519 signature of
that manifest (`model.manifest.json.sig`), so anyone with the public key can check that the weights
are exactly what the owner released. The ownership fingerprint is an HMAC-SHA256 of the weights digest
under the owner's secret: only the owner can produce or check it, and it names the exact weights (it
does not survive fine-tuning or re-quantisation, which produce different weights).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from greenstack.carbon.integrity import sign_file, verify_file
from greenstack.errors import ConfigError, DataError, Problem
from greenstack.io import atomic_write_json

MANIFEST = "model.manifest.json"
FORMAT = "greenstack.model/1"


def _weights(path: str | Path) -> Path:
    p = Path(path)
    weights = p / "model.safetensors" if p.is_dir() else p
    if not weights.is_file():
        raise ConfigError(Problem("PATH", str(path), "no model.safetensors here", "pass a run dir or the weights file"))
    return weights


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _owner_secret(env: str) -> bytes:
    value = os.environ.get(env)
    if not value:
        raise ConfigError(Problem("--owner-key-env", env, "environment variable not set",
                                  f"export {env}=<a secret only the owner knows>"))
    return value.encode()


def fingerprint(weights_sha256: str, owner: str, secret: bytes) -> str:
    return hmac.new(secret, f"{owner}:{weights_sha256}".encode(), hashlib.sha256).hexdigest()


def sign_model(path: str | Path, key: str | Path, owner: str | None = None, owner_key_env: str | None = None
               ) -> Path:
    """Write and sign the manifest next to the weights; returns the manifest path."""
    weights = _weights(path)
    digest = _sha256(weights)
    run_id_file = weights.parent / ".greenstack" / "run_id"
    manifest: dict[str, Any] = {
        "format": FORMAT, "weights": weights.name, "sha256": digest, "bytes": weights.stat().st_size,
        "run_id": run_id_file.read_text().strip() if run_id_file.is_file() else None,
        "signed_at": datetime.now(timezone.utc).isoformat(), "owner": owner, "fingerprint": None,
    }
    if owner and owner_key_env:
        manifest["fingerprint"] = fingerprint(digest, owner, _owner_secret(owner_key_env))
    out = weights.parent / MANIFEST
    atomic_write_json(out, manifest)
    sign_file(out, key)
    return out


def verify_model(path: str | Path, pub: str | Path, owner_key_env: str | None = None) -> dict[str, Any]:
    """Check signature, weights hash and (with the owner's secret) the fingerprint; DataError if any fails."""
    weights = _weights(path)
    manifest_path = weights.parent / MANIFEST
    verify_file(manifest_path, pub)
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(Problem(MANIFEST, manifest.get("format"), "not a greenstack model manifest"))
    digest = _sha256(weights)
    if digest != manifest["sha256"]:
        raise DataError(Problem(weights.name, digest[:16], "weights do not match the signed manifest",
                                "the file was modified after signing"))
    if owner_key_env:
        if not manifest.get("fingerprint"):
            raise DataError(Problem(MANIFEST, None, "manifest carries no ownership fingerprint"))
        expected = fingerprint(digest, manifest["owner"], _owner_secret(owner_key_env))
        if not hmac.compare_digest(expected, manifest["fingerprint"]):
            raise DataError(Problem("fingerprint", manifest["owner"], "ownership fingerprint does not match",
                                    "wrong owner secret, or not this owner's model"))
    return manifest
