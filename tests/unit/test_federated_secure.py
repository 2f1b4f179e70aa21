"""Secure aggregation and the TLS channel without training: the masks cancel, single messages are noise,
and only peers holding this run's certificates get in."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest
import torch

from greenstack.errors import ConfigError
from greenstack.federated import secure
from greenstack.federated.transport import TlsChannel, TlsFiles, TlsPeerRefused, check_tls_dir, keygen


def _keys(world: int) -> list[dict[int, bytes]]:
    pairs = [secure.KeyPair.generate() for _ in range(world)]
    publics = [p.public_bytes() for p in pairs]
    return [p.pair_keys(publics, rank) for rank, p in enumerate(pairs)]


def test_fixed_point_codes_round_trip_and_report_clipping():
    x = torch.tensor([0.0, 1.5, -2.25, 1e-7, -123.456, 3e6])
    codes, clipped = secure.encode(x)
    assert codes.dtype == torch.int64 and int(codes.min()) >= 0 and int(codes.max()) <= secure.MODULUS_MASK
    back = secure.decode(codes)
    assert clipped == 0
    assert torch.allclose(back, x.double(), atol=2 ** -secure.FRACTION_BITS)
    _, clipped = secure.encode(torch.tensor([secure.LIMIT * 2, 1.0]))
    assert clipped == 1


def test_masks_cancel_in_the_sum_and_a_round_restricted_to_participants_stays_exact():
    torch.manual_seed(0)
    world, n = 4, 5000
    keys = _keys(world)
    updates = [torch.randn(n) * (r + 1) for r in range(world)]
    steps = [8, 0, 4, 8]  # rank 1 sits this round out: masks are drawn among the other three only
    participants = [r for r, s in enumerate(steps) if s > 0]
    total = sum(steps)
    weighted = {r: updates[r] * (steps[r] / total) for r in participants}  # what each worker encodes
    sent = {r: secure.mask(secure.encode(weighted[r])[0], r, participants, keys[r], round_index=7)
            for r in participants}
    aggregated = secure.decode(secure.add_codes([sent[r] for r in participants]))
    plain = sum(weighted[r].double() for r in participants)
    assert (aggregated - plain).abs().max() <= secure.secure_sum_exact_error(len(participants)) + 1e-12
    # one region's message alone says nothing about its update: uniform codes, no correlation
    for r in participants:
        seen = secure.decode(sent[r])
        corr = torch.corrcoef(torch.stack([seen, updates[r].double()]))[0, 1].item()
        assert abs(corr) < 0.05, (r, corr)
        # and it is nowhere near the update in value either
        assert (seen - updates[r].double() * steps[r] / total).abs().median() > 1e3


def test_a_mask_drawn_for_a_missing_participant_would_break_the_sum():
    """Why the participants list matters: masking with a rank that sent nothing leaves its share in."""
    keys = _keys(3)
    codes = [secure.encode(torch.ones(10) * r)[0] for r in range(3)]
    wrong = [secure.mask(codes[r], r, [0, 1, 2], keys[r], 0) for r in (0, 2)]  # rank 1 did not send
    assert not torch.allclose(secure.decode(secure.add_codes(wrong)), torch.full((10,), 2.0, dtype=torch.float64))


def test_masks_differ_per_round_and_pair():
    k = _keys(3)
    a = secure.pair_mask(k[0][1], 0, 64)
    assert torch.equal(a, secure.pair_mask(k[1][0], 0, 64))  # both ends derive the same stream
    assert not torch.equal(a, secure.pair_mask(k[0][1], 1, 64))
    assert not torch.equal(a, secure.pair_mask(k[0][2], 0, 64))


def test_shared_support_is_the_same_everywhere_and_changes_by_round():
    a = secure.shared_support(1000, 0.1, seed=5, round_index=3)
    assert a.numel() == 100 and torch.equal(a, secure.shared_support(1000, 0.1, seed=5, round_index=3))
    assert not torch.equal(a, secure.shared_support(1000, 0.1, seed=5, round_index=4))
    assert torch.equal(secure.shared_support(10, 1.0, 0, 0), torch.arange(10))


# -- TLS -----------------------------------------------------------------------------------------
REGIONS = ["hub", "edge"]
RANK_REGIONS = ["hub", "edge", "edge"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> tuple[Path, Path]:
    good = tmp_path_factory.mktemp("run-pki")
    other = tmp_path_factory.mktemp("other-pki")
    keygen(REGIONS, good)
    keygen(REGIONS, other)
    return good, other


def test_keygen_writes_private_keys_owner_only_and_no_ca_key(pki):
    good, _ = pki
    names = sorted(p.name for p in good.iterdir())
    assert names == ["ca.pem", "edge.key", "edge.pem", "hub.key", "hub.pem"]
    assert (good / "hub.key").stat().st_mode & 0o077 == 0
    assert check_tls_dir(str(good), REGIONS) == []
    problems = check_tls_dir(str(good), ["hub", "moon"])
    assert problems and "moon.pem" in problems[0].reason
    with pytest.raises(ConfigError, match="named twice"):
        keygen(["a", "a"], good / "x")


class _Relay:
    """A TCP forwarder between a worker and the coordinator that records every byte (a wiretap)."""

    def __init__(self, target_port: int) -> None:
        self.captured = bytearray()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = target_port
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        client, _ = self.server.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target))

        def pump(src: socket.socket, dst: socket.socket) -> None:
            while True:
                try:
                    data = src.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for s in (src, dst):
                        try:
                            s.shutdown(socket.SHUT_RDWR)
                        except OSError:
                            pass
                    return
                self.captured += data
                dst.sendall(data)

        threading.Thread(target=pump, args=(client, upstream), daemon=True).start()
        threading.Thread(target=pump, args=(upstream, client), daemon=True).start()


def _run_ranks(hub: TlsChannel, workers: dict[int, object]) -> dict[int, object]:
    results: dict[int, object] = {}

    def work(rank: int, make) -> None:
        try:
            ch = make()
            results[rank] = ch.all_gather_bytes(payload(rank))
            ch.close()
        except Exception as e:  # noqa: BLE001 - the test reads it
            results[rank] = e

    threads = [threading.Thread(target=work, args=(r, m)) for r, m in workers.items()]
    for t in threads:
        t.start()
    try:
        hub.accept()
        results[0] = hub.all_gather_bytes(payload(0))
    except Exception as e:  # noqa: BLE001
        results[0] = e
    finally:
        hub.close()
    for t in threads:
        t.join(20)
    return results


def payload(rank: int) -> bytes:
    return (torch.arange(256, dtype=torch.float32) * (rank + 1.5)).numpy().tobytes()


def test_tls_all_gather_reaches_every_rank_and_the_wire_carries_no_plaintext(pki):
    good, _ = pki
    hub = TlsChannel.serve(TlsFiles.for_region(good, "hub"), RANK_REGIONS, timeout_s=20)
    relay = _Relay(hub.port)
    make = {r: (lambda r=r, port=(relay.port if r == 1 else hub.port): TlsChannel.connect(
        TlsFiles.for_region(good, "edge"), r, 3, "hub", "127.0.0.1", port, timeout_s=20)) for r in (1, 2)}
    results = _run_ranks(hub, make)
    expected = [payload(r) for r in range(3)]
    assert all(results[r] == expected for r in range(3)), results
    wire = bytes(relay.captured)
    assert len(wire) > 3 * 1024  # the whole exchange went through the tap...
    for r in range(3):  # ...and no 16-byte run of any rank's tensor bytes appears on it
        data = payload(r)
        assert not any(data[i:i + 16] in wire for i in range(0, len(data) - 16, 16)), r


def test_a_peer_with_another_runs_certificate_is_refused_and_named(pki):
    good, other = pki
    hub = TlsChannel.serve(TlsFiles.for_region(good, "hub"), ["hub", "edge"], timeout_s=2)
    make = {1: lambda: TlsChannel.connect(TlsFiles.for_region(other, "edge"), 1, 2, "hub", "127.0.0.1",
                                          hub.port, timeout_s=2)}
    results = _run_ranks(hub, make)
    assert isinstance(results[1], TlsPeerRefused) and "refused" in str(results[1])
    assert isinstance(results[0], TlsPeerRefused)
    assert "did not join" in str(results[0]) and "peer 127.0.0.1:" in str(results[0])
    assert "TLS handshake failed" in hub.refused[0]


def test_a_peer_claiming_another_regions_rank_is_refused(pki):
    good, _ = pki
    hub = TlsChannel.serve(TlsFiles.for_region(good, "hub"), ["hub", "edge", "hub"], timeout_s=2)
    make = {2: lambda: TlsChannel.connect(TlsFiles.for_region(good, "edge"), 2, 3, "hub", "127.0.0.1",
                                          hub.port, timeout_s=2)}
    results = _run_ranks(hub, make)
    assert isinstance(results[2], TlsPeerRefused)
    assert any("presents region 'edge'" in m and "claims rank 2 of region 'hub'" in m for m in hub.refused)
