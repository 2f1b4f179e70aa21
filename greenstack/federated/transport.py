"""The geo exchange over mutually authenticated TLS 1.3: per-run certificates and a star channel.

gloo and NCCL carry tensors in the clear, and no peer proves who it is. With `federated.transport=tls`,
every message of the geo exchange goes through `TlsChannel` instead. That covers the starting
weights, the round plans, the headers, the updates and the final totals. Every worker connects
to the coordinator (rank 0) with the certificate of its own region, and the coordinator relays each
all-gather. A peer whose certificate is not signed by the run's CA is refused during the handshake.
A peer whose certificate belongs to another region than the rank it claims is refused after it.
Each refusal names the peer.

`keygen` makes the run's CA, signs one certificate per region and discards the CA key. Nobody can
mint a new peer for the run afterwards, not even the person who ran it.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import ssl
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from greenstack.errors import ConfigError, GreenstackError, Problem

log = logging.getLogger("greenstack")
_LEN = struct.Struct("!Q")
_HELLO = struct.Struct("!I")
WELCOME = b"greenstack-tls-ok"
SAN_SUFFIX = ".greenstack"


class TlsPeerRefused(GreenstackError):
    """The other end of a TLS link did not prove it belongs to this run."""


# -- certificates ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class TlsFiles:
    """Where one region's TLS material lives in a keygen directory."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def for_region(cls, directory: str | Path, region: str) -> TlsFiles:
        d = Path(directory).expanduser()
        return cls(d / "ca.pem", d / f"{region}.pem", d / f"{region}.key")


def check_tls_dir(directory: object, regions: Sequence[str], key: str = "federated.tls.dir") -> list[Problem]:
    """Problems with a keygen directory for these regions (every missing file listed)."""
    if not directory:
        return [Problem(key, directory, "transport=tls needs the run's certificates",
                        f"greenstack federated keygen --regions {','.join(regions)} --out DIR, then {key}=DIR")]
    problems = []
    for region in regions:
        files = TlsFiles.for_region(str(directory), region)
        for path in (files.ca, files.cert, files.key):
            if not path.is_file():
                problems.append(Problem(key, str(directory), f"{path.name} is missing (region {region})",
                                        "run greenstack federated keygen for every region of the run"))
    return _dedupe(problems)


def _dedupe(problems: list[Problem]) -> list[Problem]:
    seen, out = set(), []
    for p in problems:
        if p.reason not in seen:
            seen.add(p.reason)
            out.append(p)
    return out


def keygen(regions: Sequence[str], out: str | Path, *, days: int = 30) -> list[Path]:
    """A run's CA certificate and one certificate + key per region in `out`; the CA key is discarded."""
    names = [str(r) for r in regions]
    if not names or any(not n or "/" in n or n.startswith(".") for n in names):
        raise ConfigError("needs region names (as in federated.regions), e.g. --regions eu-north,us-west",
                          key="--regions", value=",".join(names))
    if len(set(names)) != len(names):
        raise ConfigError("a region is named twice", key="--regions", value=",".join(names))
    folder = Path(out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"greenstack run CA {now:%Y%m%dT%H%M%SZ}")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    written = [_write(folder / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)]
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(name + SAN_SUFFIX)]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        written.append(_write(folder / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM), 0o644))
        written.append(_write(folder / f"{name}.key", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600))
    return written


def _write(path: Path, data: bytes, mode: int) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)
    return path


def _context(files: TlsFiles, *, server: bool) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
        ctx.load_verify_locations(str(files.ca))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"cannot load the TLS material {files.cert.name}/{files.key.name}/{files.ca.name}: {e}",
                          key="federated.tls.dir", value=str(files.ca.parent),
                          fix="run greenstack federated keygen for this run's regions") from None
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _region_of(tls_sock: ssl.SSLSocket) -> str:
    cert = tls_sock.getpeercert() or {}
    for rdn in cert.get("subject", ()):
        for k, v in rdn:
            if k == "commonName":
                return str(v)
    return "?"


# -- framing --------------------------------------------------------------------------------------
def _send(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the peer closed the connection")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _recv(sock: socket.socket) -> bytes:
    (n,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return _recv_exact(sock, n)


# -- the channel ----------------------------------------------------------------------------------
class TlsChannel:
    """All-gather of byte strings among `world_size` ranks, relayed by rank 0 over mutual TLS 1.3.

    Rank 0 builds it with `serve` and then `accept`; every other rank builds it with `connect`.
    `bytes_sent` counts this rank's application bytes, before TLS framing.
    """

    def __init__(self, rank: int, world_size: int, timeout_s: float) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.bytes_sent = 0
        self.refused: list[str] = []  # rank 0: peers refused while waiting for the run's workers
        self._peers: dict[int, ssl.SSLSocket] = {}
        self._server: socket.socket | None = None
        self._ctx: ssl.SSLContext | None = None
        self._rank_regions: list[str] = []

    # rank 0 ------------------------------------------------------------------------------------
    @classmethod
    def serve(cls, files: TlsFiles, rank_regions: Sequence[str], host: str = "127.0.0.1", port: int = 0,
              timeout_s: float = 300.0) -> TlsChannel:
        """Rank 0: listen on host:port (0 = any free port; see `.port`) for the other ranks."""
        ch = cls(0, len(rank_regions), timeout_s)
        ch._rank_regions = list(rank_regions)
        ch._ctx = _context(files, server=True)
        srv = socket.create_server((host, int(port)), backlog=max(8, 2 * len(rank_regions)))
        srv.settimeout(1.0)
        ch._server = srv
        return ch

    @property
    def port(self) -> int:
        assert self._server is not None, "only rank 0 listens"
        return int(self._server.getsockname()[1])

    def accept(self) -> TlsChannel:
        """Rank 0: wait until every other rank has joined with its region's certificate."""
        assert self._server is not None and self._ctx is not None
        deadline = time.monotonic() + self.timeout_s
        while len(self._peers) < self.world_size - 1:
            if time.monotonic() > deadline:
                missing = [r for r in range(1, self.world_size) if r not in self._peers]
                refused = f"; refused: {'; '.join(self.refused)}" if self.refused else ""
                raise TlsPeerRefused(f"federated TLS: ranks {missing} did not join within {self.timeout_s:g} s"
                                     f"{refused}")
            try:
                raw, addr = self._server.accept()
            except TimeoutError:
                continue
            peer = f"{addr[0]}:{addr[1]}"
            raw.settimeout(min(self.timeout_s, 30.0))  # a silent peer cannot hold the door for long
            try:
                tls = self._ctx.wrap_socket(raw, server_side=True)
                (claimed,) = _HELLO.unpack(_recv_exact(tls, _HELLO.size))
            except (ssl.SSLError, OSError, ConnectionError, struct.error) as e:
                self._refuse(raw, peer, f"TLS handshake failed ({_reason(e)}): not a peer of this run")
                continue
            region = _region_of(tls)
            if not 0 < claimed < self.world_size or claimed in self._peers:
                self._refuse(tls, peer, f"claims rank {claimed}, which is not free in this run")
                continue
            if region != self._rank_regions[claimed]:
                self._refuse(tls, peer, f"presents region {region!r}'s certificate but claims rank {claimed} "
                                        f"of region {self._rank_regions[claimed]!r}")
                continue
            _send(tls, WELCOME)
            tls.settimeout(self.timeout_s)
            self._peers[claimed] = tls
            log.info("federated TLS: rank %d (%s) joined from %s", claimed, region, peer)
        self._server.close()
        self._server = None
        return self

    def _refuse(self, sock: socket.socket, peer: str, why: str) -> None:
        message = f"peer {peer} {why}"
        self.refused.append(message)
        log.warning("federated TLS: refused %s", message)
        try:
            sock.close()
        except OSError:
            pass

    # other ranks --------------------------------------------------------------------------------
    @classmethod
    def connect(cls, files: TlsFiles, rank: int, world_size: int, coordinator_region: str, host: str, port: int,
                timeout_s: float = 300.0) -> TlsChannel:
        """Rank > 0: join the coordinator at host:port, proving this rank's region with its certificate."""
        ch = cls(rank, world_size, timeout_s)
        ctx = _context(files, server=False)
        where = f"{host}:{port}"
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                raw = socket.create_connection((host, int(port)), timeout=timeout_s)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise TlsPeerRefused(f"federated TLS: rank {rank} could not reach the coordinator at {where}: "
                                         f"{e}") from None
                time.sleep(0.2)
        try:
            tls = ctx.wrap_socket(raw, server_hostname=coordinator_region + SAN_SUFFIX)
            _send_raw(tls, _HELLO.pack(rank))
            answer = _recv(tls)
        except (ssl.SSLError, OSError, ConnectionError) as e:
            raw.close()
            raise TlsPeerRefused(
                f"federated TLS: the link between rank {rank} and the coordinator at {where} was refused "
                f"({_reason(e)}): either the coordinator does not accept this rank's certificate "
                f"({files.cert}) or it presented one not signed by this run's CA ({files.ca}); all regions "
                "must use certificates from the same `greenstack federated keygen`") from None
        if answer != WELCOME:
            tls.close()
            raise TlsPeerRefused(f"federated TLS: unexpected greeting from the coordinator at {where}")
        ch._peers[0] = tls
        return ch

    # the one collective -------------------------------------------------------------------------
    def all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's `data`, in rank order, on every rank."""
        if self.rank == 0:
            gathered = [data] + [_recv(self._peers[r]) for r in range(1, self.world_size)]
            blob = b"".join(_LEN.pack(len(g)) + g for g in gathered)
            for r in range(1, self.world_size):
                _send(self._peers[r], blob)
                self.bytes_sent += _LEN.size + len(blob)
            return gathered
        _send(self._peers[0], data)
        self.bytes_sent += _LEN.size + len(data)
        blob = _recv(self._peers[0])
        out, at = [], 0
        while at < len(blob):
            (n,) = _LEN.unpack_from(blob, at)
            at += _LEN.size
            out.append(blob[at:at + n])
            at += n
        if len(out) != self.world_size:
            raise GreenstackError(f"federated TLS: the coordinator relayed {len(out)} messages for "
                                  f"{self.world_size} ranks")
        return out

    def close(self) -> None:
        for sock in self._peers.values():
            try:
                sock.close()
            except OSError:
                pass
        self._peers.clear()
        if self._server is not None:
            self._server.close()
            self._server = None


def _send_raw(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)


def _reason(error: BaseException) -> str:
    text = getattr(error, "reason", None) or str(error) or type(error).__name__
    return str(text)
