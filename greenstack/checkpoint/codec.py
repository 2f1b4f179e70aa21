"""Snapshot <-> files: safetensors weights, a weights-only torch payload, a JSON state and a manifest.

The manifest (sha256 of every file, written last) is what makes a checkpoint valid: a checkpoint
without one, or whose files do not match it, is never loaded.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from typing import Any

import torch

from greenstack.checkpoint.crypto import DecryptionError, KeyProvider, decrypt, encrypt, new_data_key
from greenstack.checkpoint.snapshot import Snapshot

FORMAT = "greenstack.checkpoint/1"
MANIFEST = "manifest.json"


class CheckpointError(Exception):
    """A checkpoint is incomplete, corrupt, tampered with or unreadable with the given key."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(snapshot: Snapshot, key: KeyProvider | None = None) -> dict[str, bytes]:
    """All files of a checkpoint, manifest included (write the manifest last)."""
    from safetensors.torch import save

    buf = io.BytesIO()
    torch.save(snapshot.trainer, buf)
    state = {"step": snapshot.step, "epoch": snapshot.epoch, "batch_in_epoch": snapshot.batch_in_epoch,
             "samples_seen": snapshot.samples_seen, "rng": snapshot.rng, "created_at": snapshot.created_at,
             "meta": snapshot.meta}
    plain = {"model.safetensors": save(snapshot.model), "trainer.pt": buf.getvalue(),
             "state.json": json.dumps(state).encode()}
    manifest: dict[str, Any] = {"format": FORMAT, "name": snapshot.name, "step": snapshot.step,
                                "created_at": snapshot.created_at, "files": {}, "encryption": None}
    files: dict[str, bytes] = {}
    data_key = new_data_key() if key is not None else None
    if key is not None and data_key is not None:
        manifest["encryption"] = {"scheme": "AES-256-GCM+AESKW", "key_id": key.key_id,
                                  "wrapped_key": base64.b64encode(key.wrap(data_key)).decode(), "nonces": {}}
    for name, data in plain.items():
        if data_key is not None:
            nonce, data = encrypt(data_key, data, aad=f"{snapshot.name}/{name}".encode())
            manifest["encryption"]["nonces"][name] = base64.b64encode(nonce).decode()
        files[name] = data
        manifest["files"][name] = {"sha256": _sha256(data), "bytes": len(data)}
    files[MANIFEST] = json.dumps(manifest, indent=1).encode()
    return files


def verify(files: dict[str, bytes]) -> dict[str, Any]:
    """The manifest, after checking every file against it; raises CheckpointError naming the problem."""
    if MANIFEST not in files:
        raise CheckpointError("no manifest (incomplete or interrupted write)")
    try:
        manifest = json.loads(files[MANIFEST])
    except json.JSONDecodeError as e:
        raise CheckpointError(f"manifest is not valid JSON: {e}") from e
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"unknown checkpoint format {manifest.get('format')!r}")
    for name, entry in manifest["files"].items():
        if name not in files:
            raise CheckpointError(f"missing file {name}")
        if _sha256(files[name]) != entry["sha256"]:
            raise CheckpointError(f"{name}: sha256 mismatch (corrupt or tampered)")
    return manifest


def decode(files: dict[str, bytes], key: KeyProvider | None = None) -> Snapshot:
    """Verify then load a checkpoint (torch payload with weights_only=True)."""
    from safetensors.torch import load

    manifest = verify(files)
    enc = manifest.get("encryption")
    plain = {n: files[n] for n in manifest["files"]}
    if enc:
        if key is None:
            raise CheckpointError("checkpoint is encrypted: set the master key (checkpointing.encryption)")
        try:
            data_key = key.unwrap(base64.b64decode(enc["wrapped_key"]))
            plain = {n: decrypt(data_key, base64.b64decode(enc["nonces"][n]), files[n],
                                aad=f"{manifest['name']}/{n}".encode()) for n in manifest["files"]}
        except DecryptionError as e:
            raise CheckpointError(str(e)) from e
    state = json.loads(plain["state.json"])
    trainer = torch.load(io.BytesIO(plain["trainer.pt"]), weights_only=True, map_location="cpu")
    return Snapshot(step=state["step"], epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"],
                    samples_seen=state["samples_seen"], model=load(plain["model.safetensors"]), trainer=trainer,
                    rng=state["rng"], created_at=state["created_at"], meta=state.get("meta", {}))
