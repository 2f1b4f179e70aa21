"""`greenstack federated keygen`: the per-run certificates of `federated.transport=tls`."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def run_federated(argv: Sequence[str]) -> int:
    """Entry point of `greenstack federated ...`."""
    parser = argparse.ArgumentParser(prog="greenstack federated", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    kg = sub.add_parser("keygen", help="a run's CA certificate and one certificate + key per region "
                                       "(the CA key is discarded: nobody can add a peer later)")
    kg.add_argument("--regions", required=True, help="comma-separated region names, as in federated.regions")
    kg.add_argument("--out", required=True, help="directory to write ca.pem, REGION.pem, REGION.key")
    kg.add_argument("--days", type=int, default=30, help="validity of the certificates (default 30)")
    args = parser.parse_args(list(argv))
    from greenstack.federated.transport import keygen

    regions = [r.strip() for r in args.regions.split(",") if r.strip()]
    written = keygen(regions, args.out, days=args.days)
    print(f"wrote {len(written)} files to {args.out}: ca.pem (give it to every region) and, per region, "
          "REGION.pem + REGION.key (give each region only its own; keys are 0600)")
    print(f"use: federated.transport=tls federated.tls.dir={args.out}")
    return 0
