"""Integrity of carbon-intensity data: spike detection/repair, multi-source cross-check, Ed25519 signatures.

Why: a single bad hour (a publisher glitch, a unit slip) skews both the emissions of the runs that
overlap it and a forecaster trained on it; two providers that disagree badly mean at least one is
wrong; and a data file shared between teams (a carbon pool, an audit) must be provably unmodified.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from greenstack.errors import ConfigError, DataError, Problem

MAD_TO_SIGMA = 1.4826  # MAD x this = standard deviation for normal data
SIG_SUFFIX = ".sig"


# --- spikes -----------------------------------------------------------------------------------------

@dataclass
class AnomalyReport:
    """Which hours are spikes, the robust reference they were judged against, and the repaired values."""

    flags: pd.Series  # bool per row
    median: pd.Series
    mad: pd.Series
    repaired: pd.Series

    @property
    def count(self) -> int:
        return int(self.flags.sum())

    def rows(self) -> list[int]:
        """Positional indices of flagged rows."""
        return [int(i) for i in np.flatnonzero(self.flags.to_numpy())]


def detect_anomalies(values: pd.Series | np.ndarray, *, window: int = 25, k: float = 6.0,
                     min_rel_scale: float = 0.02, max_run: int = 2) -> AnomalyReport:
    """Flag points outside rolling median +- k x MAD (centred window of `window` rows).

    Only excursions of at most `max_run` consecutive rows count as spikes: a grid that stays high
    for hours (a windless evening) is weather, not a glitch, and must not be "repaired".

    Why median/MAD: a spike inflates a mean and standard deviation enough to hide itself; the median
    and MAD ignore it. `min_rel_scale` (share of the local median) floors the MAD so that nearly flat
    series (nuclear/hydro grids) do not turn ordinary noise into "spikes".
    """
    s = pd.Series(np.asarray(values, dtype="float64")) if not isinstance(values, pd.Series) else values.astype(
        "float64")
    if window < 3:
        raise ConfigError(Problem("window", window, "must be >= 3 rows"))
    if not k > 0:
        raise ConfigError(Problem("k", k, "must be > 0"))
    med = s.rolling(window, center=True, min_periods=max(3, window // 4)).median()
    dev = (s - med).abs()
    mad = dev.rolling(window, center=True, min_periods=max(3, window // 4)).median()
    scale = np.maximum(mad * MAD_TO_SIGMA, min_rel_scale * med.abs())
    flags = ((dev > k * scale) & med.notna()).to_numpy()
    flags = pd.Series(_short_runs(flags, max_run), index=s.index)
    repaired = s.where(~flags, med)
    return AnomalyReport(flags.fillna(False).astype(bool), med, mad, repaired)


def _short_runs(mask: np.ndarray, max_run: int) -> np.ndarray:
    """Keep only runs of True no longer than max_run."""
    out = mask.copy()
    if not mask.any():
        return out
    edges = np.diff(np.concatenate([[0], mask.astype(int), [0]]))
    for start, stop in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        if stop - start > max_run:
            out[start:stop] = False
    return out


def repair_spikes(df: pd.DataFrame, *, column: str = "carbon_intensity", window: int = 25,
                  k: float = 6.0) -> tuple[pd.DataFrame, AnomalyReport]:
    """Replace spikes in `column` by the rolling median and mark those rows `estimated`."""
    report = detect_anomalies(df[column], window=window, k=k)
    out = df.copy()
    out[column] = report.repaired.to_numpy()
    est = out["estimated"].to_numpy().astype(int) if "estimated" in out.columns else np.zeros(len(out), int)
    out["estimated"] = np.where(report.flags.to_numpy(), 1, est)
    return out, report


# --- cross-check ------------------------------------------------------------------------------------

def _hourly(df: pd.DataFrame | pd.Series) -> pd.Series:
    if isinstance(df, pd.Series):
        s = df
    else:
        s = pd.Series(df["carbon_intensity"].to_numpy(dtype="float64"), index=pd.DatetimeIndex(df["timestamp"]))
    if not isinstance(s.index, pd.DatetimeIndex) or s.index.tz is None:
        raise DataError(Problem("timestamp", None, "cross-check needs timezone-aware timestamps"))
    s = s.tz_convert("UTC")
    return s.groupby(s.index.floor("h")).mean()


def cross_check(a: pd.DataFrame | pd.Series, b: pd.DataFrame | pd.Series, *, threshold_pct: float = 25.0,
                names: tuple[str, str] = ("a", "b")) -> pd.DataFrame:
    """Hours (UTC, both sources averaged to hours) where two sources differ by more than threshold_pct.

    The difference is relative to the mean of the two, so it is symmetric in the sources. Returns a
    frame with timestamp, both values and `diff_pct`, one row per disagreeing hour.
    """
    if not threshold_pct > 0:
        raise ConfigError(Problem("threshold_pct", threshold_pct, "must be > 0"))
    ha, hb = _hourly(a), _hourly(b)
    joined = pd.concat([ha.rename(names[0]), hb.rename(names[1])], axis=1, join="inner").dropna()
    mean = (joined[names[0]] + joined[names[1]]) / 2
    diff = (joined[names[0]] - joined[names[1]]).abs() / mean.where(mean > 0) * 100
    out = joined.assign(diff_pct=diff.round(2))
    out = out[out["diff_pct"] > threshold_pct]
    out.index.name = "timestamp"
    out.attrs["overlap_hours"] = len(joined)
    return out.reset_index()


# --- Ed25519 signatures ------------------------------------------------------------------------------

def generate_keypair(private_path: str | Path, public_path: str | Path | None = None, *,
                     overwrite: bool = False) -> tuple[Path, Path]:
    """Write a new Ed25519 private key (PEM, PKCS8, mode 0600) and its public key (PEM)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    priv = Path(private_path)
    pub = Path(public_path) if public_path else priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists() and not overwrite:
            raise ConfigError(Problem("key", str(p), "already exists", "choose another path or pass --force"))
    key = Ed25519PrivateKey.generate()
    priv.parent.mkdir(parents=True, exist_ok=True)
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _load_private(path: Path):  # noqa: ANN202 - cryptography key type, imported lazily
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read(path, "--key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as err:
        raise ConfigError(Problem("--key", str(path), f"not an unencrypted PEM private key ({err})",
                                  "create one with `greenstack carbon keygen`")) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(Problem("--key", str(path), f"{type(key).__name__} is not an Ed25519 key",
                                  "create one with `greenstack carbon keygen`"))
    return key


def _load_public(path: Path):  # noqa: ANN202
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = _read(path, "--pub")
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as err:
        raise ConfigError(Problem("--pub", str(path), f"not a PEM public key ({err})")) from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(Problem("--pub", str(path), f"{type(key).__name__} is not an Ed25519 key"))
    return key


def _read(path: Path, key: str) -> bytes:
    if not path.is_file():
        raise ConfigError(Problem(key, str(path), "file not found"))
    return path.read_bytes()


def signature_path(path: str | Path) -> Path:
    """Where the detached signature of `path` lives: FILE.sig."""
    p = Path(path)
    return p.with_name(p.name + SIG_SUFFIX)


def sign_file(path: str | Path, key_path: str | Path, sig_path: str | Path | None = None) -> Path:
    """Sign a file's bytes with an Ed25519 private key; writes the base64 signature to FILE.sig."""
    data = _read(Path(path), "FILE")
    signature = _load_private(Path(key_path)).sign(data)
    out = Path(sig_path) if sig_path else signature_path(path)
    out.write_text(base64.b64encode(signature).decode("ascii") + "\n", encoding="ascii")
    return out


def verify_file(path: str | Path, pub_path: str | Path, sig_path: str | Path | None = None) -> Path:
    """Check FILE against its detached signature; raises DataError if the file or signature was altered."""
    from cryptography.exceptions import InvalidSignature

    sig_file = Path(sig_path) if sig_path else signature_path(path)
    data = _read(Path(path), "FILE")
    raw = _read(sig_file, "signature")
    try:
        signature = base64.b64decode(raw.strip(), validate=True)
    except ValueError:
        signature = raw
    if len(signature) != 64:
        raise DataError(Problem("signature", str(sig_file), "not an Ed25519 signature (expected 64 bytes)"))
    try:
        _load_public(Path(pub_path)).verify(signature, data)
    except InvalidSignature:
        raise DataError(Problem(str(path), sig_file.name, "signature does not match",
                                "the file or its signature was modified, or this is not the signer's public key"
                                )) from None
    return sig_file
