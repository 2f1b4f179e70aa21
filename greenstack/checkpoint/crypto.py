"""Envelope encryption for checkpoints: AES-256-GCM with a fresh data key per checkpoint.

The data key is wrapped (RFC 3394 AES key wrap) by a master key that never touches disk in the clear.
`KeyProvider` is the seam for a KMS: implement `wrap`/`unwrap` and pass it instead of `LocalKey`.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Protocol

from greenstack.errors import ConfigError

KEY_ENV = "GREENSTACK_CHECKPOINT_KEY"


class KeyProvider(Protocol):
    key_id: str

    def wrap(self, data_key: bytes) -> bytes: ...

    def unwrap(self, wrapped: bytes) -> bytes: ...


class LocalKey:
    """A 256-bit master key from an environment variable or a key file (base64 or 32 raw bytes)."""

    def __init__(self, key: bytes, key_id: str) -> None:
        if len(key) != 32:
            raise ConfigError("the checkpoint master key must be 32 bytes (AES-256)", key="checkpointing.encryption",
                              value=f"{len(key)} bytes", fix="generate one: python -c \"import os,base64;"
                                                             "print(base64.b64encode(os.urandom(32)).decode())\"")
        self._key, self.key_id = key, key_id

    @classmethod
    def from_config(cls, env: str = KEY_ENV, key_file: str | None = None) -> LocalKey:
        if key_file:
            path = Path(key_file).expanduser()
            if not path.is_file():
                raise ConfigError("key file not found", key="checkpointing.encryption.key_file", value=key_file)
            raw = path.read_bytes()
            source = f"file:{path.name}"
        else:
            value = os.environ.get(env)
            if not value:
                raise ConfigError(f"encryption is on but ${env} is not set", key="checkpointing.encryption.key_env",
                                  value=env, fix=f"export {env}=<base64 of 32 random bytes> or set key_file")
            raw = value.encode()
            source = f"env:{env}"
        raw = raw.strip()
        if len(raw) != 32:
            try:
                raw = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as e:
                raise ConfigError("master key is neither 32 raw bytes nor base64", key="checkpointing.encryption",
                                  value=source) from e
        return cls(raw, key_id=source)

    def wrap(self, data_key: bytes) -> bytes:
        from cryptography.hazmat.primitives.keywrap import aes_key_wrap

        return aes_key_wrap(self._key, data_key)

    def unwrap(self, wrapped: bytes) -> bytes:
        from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

        try:
            return aes_key_unwrap(self._key, wrapped)
        except InvalidUnwrap as e:
            raise DecryptionError("wrong master key: the checkpoint's data key does not unwrap") from e


class DecryptionError(Exception):
    """Raised when a checkpoint cannot be decrypted (wrong key or tampered bytes)."""


def new_data_key() -> bytes:
    return os.urandom(32)


def encrypt(data_key: bytes, plaintext: bytes, aad: bytes) -> tuple[bytes, bytes]:
    """(nonce, ciphertext+tag) under AES-256-GCM; `aad` binds the ciphertext to its file name."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return nonce, AESGCM(data_key).encrypt(nonce, plaintext, aad)


def decrypt(data_key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(data_key).decrypt(nonce, ciphertext, aad)
    except InvalidTag as e:
        raise DecryptionError("authentication failed: the checkpoint was modified or the key is wrong") from e
