"""`greenstack model keygen|sign|verify`: signed model artifacts with an ownership fingerprint
(the signing itself is `greenstack.models.signing`)."""

from __future__ import annotations

import argparse

from greenstack.carbon.integrity import generate_keypair
from greenstack.models.signing import sign_model, verify_model

_DESCRIPTION = "Signed model artifacts and an ownership fingerprint: `greenstack model keygen|sign|verify`."


def run_model(argv: list[str]) -> int:
    """Entry point of `greenstack model keygen|sign|verify`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="greenstack model", description=_DESCRIPTION)
    sub = parser.add_subparsers(dest="cmd", required=True)
    keygen = sub.add_parser("keygen", help="create an Ed25519 key pair")
    keygen.add_argument("key", help="private key path (public key: KEY.pub)")
    sign = sub.add_parser("sign", help="sign a run dir's model.safetensors")
    sign.add_argument("path")
    sign.add_argument("--key", required=True)
    sign.add_argument("--owner")
    sign.add_argument("--owner-key-env", help="env var holding the owner's fingerprint secret")
    verify = sub.add_parser("verify", help="check a signed model")
    verify.add_argument("path")
    verify.add_argument("--pub", required=True)
    verify.add_argument("--owner-key-env")
    args = parser.parse_args(argv)
    if args.cmd == "keygen":
        priv, pub = generate_keypair(args.key)
        print(f"private key {priv} (keep secret), public key {pub}")
    elif args.cmd == "sign":
        print(f"signed {sign_model(args.path, args.key, args.owner, args.owner_key_env)}")
    else:
        manifest = verify_model(args.path, args.pub, args.owner_key_env)
        owner = f", owner {manifest['owner']} (fingerprint ok)" if args.owner_key_env else ""
        print(f"OK: {manifest['weights']} sha256 {manifest['sha256'][:16]}… signature valid{owner}")
    return 0
