"""Secure aggregation of the geo exchange as plain functions: fixed-point codes and pairwise masks.

The scheme is the pairwise-masking core of Bonawitz et al. (SecAgg) in the honest-but-curious
setting. Every worker holds an X25519 key pair; each pair of workers derives one shared secret.
In each round a worker sends its work-weighted update as fixed-point integers plus, for every
other participant, a mask that the two of them expand from their secret with ChaCha20. The lower rank
adds the mask and the higher rank subtracts it, so the masks cancel in the sum modulo 2**48.
Anyone who sees a single message sees uniform noise; only the sum of all participants' messages is
the weighted update.

Choices forced by greenstack's geo setting:

* **Common support.** Top-k picks coordinates from the worker's own update, so masked top-k
  values would not line up and the indices alone leak where the update is large. With secure
  aggregation a round's coordinates are a random subset (`shared_support`), drawn from a seed
  every worker knows, and error feedback keeps what was not sent, as it does for top-k.
* **Weighting by work.** The local-step counts travel in the public round header, so every worker
  knows the weights and multiplies its own update by `steps_i / total` before encoding. The sum is
  then the weighted average itself.
* **A region sitting a round out** is known from the header before any value is sent. Masks are
  drawn only between that round's participants, so nothing is left uncancelled.
* **A worker failing mid-round** makes the round's collective fail, and with it the run. The rule is
  "the round restarts": resume from the last checkpoint, which is taken at a round boundary. There
  is no seed recovery by secret sharing.
* **Exact sums.** Values are rounded to multiples of 2**-FRACTION_BITS. A value the codes cannot
  hold is clipped, and the clipping is counted and reported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

#: codes live in Z / 2**MODULUS_BITS (held in int64, so sums of up to 2**15 codes cannot overflow)
MODULUS_BITS = 48
MODULUS_MASK = (1 << MODULUS_BITS) - 1
#: fixed-point resolution: values are multiples of 2**-FRACTION_BITS (about 6e-8)
FRACTION_BITS = 24
#: the largest magnitude a code holds without wrapping (the sum of all participants must stay below it)
LIMIT = float(1 << (MODULUS_BITS - 1 - FRACTION_BITS))
#: bytes one masked coordinate costs on the wire (an int64 code; no index: the support is shared)
CODE_BYTES = 8
PUBLIC_KEY_BYTES = 32


def encode(values: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fixed-point codes (int64 in [0, 2**48)) of float values, and how many were clipped to fit."""
    v = values.detach().double().cpu()
    clipped = int((v.abs() >= LIMIT).sum().item())
    v = v.clamp(-LIMIT + 1.0, LIMIT - 1.0)
    q = torch.round(v * (1 << FRACTION_BITS)).to(torch.int64)
    return q & MODULUS_MASK, clipped


def decode(codes: torch.Tensor) -> torch.Tensor:
    """Float64 values of codes (two's complement in 48 bits)."""
    q = codes.to(torch.int64) & MODULUS_MASK
    q = torch.where(q >= (1 << (MODULUS_BITS - 1)), q - (1 << MODULUS_BITS), q)
    return q.double() / (1 << FRACTION_BITS)


def add_codes(codes: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of code vectors modulo 2**48 (what every worker computes from the gathered messages)."""
    out = torch.zeros_like(codes[0])
    for c in codes:
        out = (out + c) & MODULUS_MASK
    return out


def shared_support(numel: int, ratio: float, seed: int, round_index: int) -> torch.Tensor:
    """The round's coordinates (sorted int64), the same on every worker: a random `ratio` of `numel`."""
    k = max(1, math.ceil(ratio * numel))
    if k >= numel:
        return torch.arange(numel, dtype=torch.int64)
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(round_index)) % (2**63))
    return torch.randperm(numel, generator=g)[:k].sort().values


@dataclass
class KeyPair:
    """One worker's X25519 key pair for a run (fresh per process: nothing secret is saved)."""

    private: X25519PrivateKey

    @classmethod
    def generate(cls) -> KeyPair:
        return cls(X25519PrivateKey.generate())

    def public_bytes(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def pair_keys(self, publics: Sequence[bytes], rank: int) -> dict[int, bytes]:
        """ChaCha20 keys shared with every other rank (HKDF of the X25519 secret, bound to both ranks)."""
        out: dict[int, bytes] = {}
        for other, pub in enumerate(publics):
            if other == rank:
                continue
            if len(pub) != PUBLIC_KEY_BYTES:
                raise ValueError(f"rank {other} sent a {len(pub)}-byte public key, expected {PUBLIC_KEY_BYTES}")
            secret = self.private.exchange(X25519PublicKey.from_public_bytes(pub))
            lo, hi = sorted((rank, other))
            out[other] = HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                              info=f"greenstack-secagg {lo}-{hi}".encode()).derive(secret)
        return out


def pair_mask(key: bytes, round_index: int, numel: int) -> torch.Tensor:
    """`numel` uniform codes in [0, 2**48) from ChaCha20 keyed by a pair's key, one stream per round."""
    nonce = int(round_index).to_bytes(8, "little") + bytes(8)
    stream = Cipher(algorithms.ChaCha20(key, nonce), mode=None).encryptor().update(bytes(8 * numel))
    words = np.frombuffer(stream, dtype="<u8") & np.uint64(MODULUS_MASK)
    return torch.from_numpy(words.astype(np.int64))


def mask(codes: torch.Tensor, rank: int, participants: Sequence[int], pair_keys: dict[int, bytes],
         round_index: int) -> torch.Tensor:
    """`codes` plus the round's pairwise masks with every other participant (they cancel in the sum)."""
    out = codes.clone()
    for other in participants:
        if other == rank:
            continue
        m = pair_mask(pair_keys[other], round_index, codes.numel())
        out = (out + m) & MODULUS_MASK if rank < other else (out - m) & MODULUS_MASK
    return out


def secure_sum_exact_error(participants: int) -> float:
    """The most the decoded sum can differ from the float sum: half a resolution step per participant."""
    return 0.5 * participants / (1 << FRACTION_BITS)
