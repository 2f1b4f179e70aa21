"""`greenstack carbon keygen|sign|verify|check`: sign carbon-intensity data files and check their values.

Why signatures: traces and ledgers are shared between teams and feed emissions reports; a detached
Ed25519 signature (FILE.sig) lets anyone with the public key confirm a file is exactly what was signed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from greenstack.errors import ConfigError, Problem


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(Problem(self.prog, None, message, f"see `{self.prog} --help`"))


def build_parser() -> argparse.ArgumentParser:
    """The `greenstack carbon` parser."""
    parser = _Parser(prog="greenstack carbon", description="carbon-intensity data files: signatures and checks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    p = sub.add_parser("keygen", help="create an Ed25519 key pair (KEY and KEY.pub)")
    p.add_argument("key", metavar="KEY", help="private key path to write (public key: KEY.pub unless --pub)")
    p.add_argument("--pub", default=None, help="public key path")
    p.add_argument("--force", action="store_true", help="overwrite existing keys")
    p = sub.add_parser("sign", help="write FILE.sig, a detached Ed25519 signature of FILE")
    p.add_argument("--key", required=True, help="Ed25519 private key (PEM)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--sig", default=None, help="signature path (default FILE.sig)")
    p = sub.add_parser("verify", help="check FILE against FILE.sig and a public key (exit 2 if tampered)")
    p.add_argument("--pub", required=True, help="Ed25519 public key (PEM)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--sig", default=None, help="signature path (default FILE.sig)")
    p = sub.add_parser("check", help="validate a trace CSV and flag spikes (rolling median +- k x MAD)")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--k", type=float, default=6.0, help="MADs from the rolling median that count as a spike")
    p.add_argument("--window", type=int, default=25, help="rolling window in rows")
    p.add_argument("--repair", default=None, metavar="OUT", help="write a repaired canonical CSV here")
    p.add_argument("--json", action="store_true")
    return parser


def run_carbon(argv: list[str]) -> int:
    """Entry point of `greenstack carbon ...`; returns the exit code."""
    from greenstack.carbon import integrity

    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv)
    if args.command == "keygen":
        priv, pub = integrity.generate_keypair(args.key, args.pub, overwrite=args.force)
        print(f"wrote private key {priv} (keep it secret) and public key {pub}")
    elif args.command == "sign":
        sig = integrity.sign_file(args.file, args.key, args.sig)
        print(f"signed {args.file} -> {sig}")
    elif args.command == "verify":
        sig = integrity.verify_file(args.file, args.pub, args.sig)
        print(f"OK: {args.file} matches {sig}")
    elif args.command == "check":
        return _check(args)
    return 0


def _check(args: argparse.Namespace) -> int:
    from greenstack.carbon import integrity, traces

    df = traces.load_csv_trace(args.file)
    repaired, report = integrity.repair_spikes(df, window=args.window, k=args.k)
    rows = report.rows()
    flagged = [{"row": r, "timestamp": df["timestamp"].iloc[r].strftime("%Y-%m-%dT%H:%M:%SZ"),
                "value": float(df["carbon_intensity"].iloc[r]), "median": round(float(report.median.iloc[r]), 2)}
               for r in rows]
    if args.repair:
        out = repaired.copy()
        out["timestamp"] = out["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
        out.to_csv(Path(args.repair), index=False)
    if args.json:
        print(json.dumps({"file": args.file, "rows": len(df), "spikes": flagged, "repaired": args.repair}))
    else:
        print(f"{args.file}: {len(df)} rows valid; {len(rows)} spike(s) beyond {args.k:g} MAD")
        for f in flagged[:20]:
            print(f"  row {f['row']} {f['timestamp']}: {f['value']:g} g/kWh (rolling median {f['median']:g})")
        if args.repair:
            print(f"repaired copy (spikes -> rolling median, marked estimated): {args.repair}")
    return 0
