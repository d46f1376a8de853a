"""Hostile or odd peers (docs/reliability.md B.3 #1, #3): non-DICOM bytes, bare TCP health
checks, truncated PDUs, and TLS with and without a client certificate."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.commands.verify import verify
from node.config import settings_from_mapping
from node.errors import ConfigError, PeerError
from node.scu import PeerAddress, echo, peer_address, send_files
from node.service import NodeService
from tests.node.dicom_factory import write_mr_series
from tests.node.fixtures import free_port, require_tool

pytestmark = pytest.mark.network


def _service(storage: Path, **tls) -> NodeService:
    mapping = {
        "node": {
            "port": 0,
            "storage": str(storage),
            "disk_low_water_mb": 0,
            "network_timeout_s": 3,
            "acse_timeout_s": 3,
        },
        "peers": [{"ae_title": "ECHOSCU"}],
    }
    if tls:
        mapping["tls"] = {"enabled": True, **tls}
    svc = NodeService(settings_from_mapping(mapping))
    svc.start()
    return svc


def _raw(port: int, payload: bytes) -> None:
    """Connect, send the bytes and hang up (a port scanner or a misdirected client)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        if payload:
            s.sendall(payload)


def test_garbage_on_the_port_leaves_the_node_serving_without_leaking_threads(tmp_path):
    svc = _service(tmp_path / "storage")
    port = svc.address[1]
    peer = PeerAddress("SPINENODE", "127.0.0.1", port)
    try:
        assert echo(peer, calling_ae="ECHOSCU") == 0
        time.sleep(0.5)
        baseline = threading.active_count()
        payloads = [
            b"SSH-2.0-OpenSSH_9.2p1\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"\x01\x00\x00\x00\x00\xc4\x00\x01",  # A-ASSOCIATE-RQ header, body missing
            b"\x53" + b"\x00" * 64,  # unknown PDU type 0x53
            b"",  # a load-balancer health check: connect and close
        ]
        for _ in range(4):
            for payload in payloads:
                _raw(port, payload)
        # each hung-up connection holds an association slot until its timeout (3 s here);
        # then every thread is gone and the node answers as before
        deadline = time.monotonic() + 20
        while threading.active_count() > baseline and time.monotonic() < deadline:
            time.sleep(0.1)
        assert threading.active_count() <= baseline
        assert echo(peer, calling_ae="ECHOSCU") == 0
    finally:
        svc.stop()


def _tls_echo(port: int, pki: Path, *, client_cert: bool) -> bool:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    if client_cert:
        context.load_cert_chain(str(pki / "client.crt"), str(pki / "client.key"))
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE", tls_args=(context, "localhost"))
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_tls_requires_a_client_certificate_signed_by_the_ca(tmp_path, pki):
    svc = _service(
        tmp_path / "storage",
        certificate=str(pki / "server.crt"),
        key=str(pki / "server.key"),
        ca=str(pki / "ca.crt"),
    )
    try:
        port = svc.address[1]
        assert _tls_echo(port, pki, client_cert=True)
        assert not _tls_echo(port, pki, client_cert=False)
        # a plain (non-TLS) association is refused too
        ae = AE(ae_title="ECHOSCU")
        ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 5
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title="SPINENODE")
        assert not assoc.is_established
    finally:
        svc.stop()


def test_row1_a_client_that_never_starts_the_tls_handshake_blocks_nobody(tmp_path, pki):
    """Issue 17, row 1: the handshake runs in the connection's own thread, bounded in time (the
    ACSE timeout, 3 s here), not in the thread that accepts every connection."""
    svc = _service(
        tmp_path / "storage",
        certificate=str(pki / "server.crt"),
        key=str(pki / "server.key"),
        ca=str(pki / "ca.crt"),
    )
    silent = [socket.create_connection(("127.0.0.1", svc.address[1]), timeout=5) for _ in range(3)]
    try:
        port = svc.address[1]
        for _ in range(3):
            start = time.monotonic()
            assert _tls_echo(port, pki, client_cert=True)
            assert time.monotonic() - start < 2.0
        # the silent connections are closed by the node once the handshake time is up
        for sock in silent:
            sock.settimeout(10)
            assert sock.recv(1) == b""
        assert verify(svc.index, svc.store.root).consistent
    finally:
        for sock in silent:
            sock.close()
        svc.stop()


def _tls_storescp(pki: Path, out: Path, port: int) -> subprocess.Popen:
    """dcmtk storescp with TLS, requiring a client certificate signed by the test CA."""
    out.mkdir()
    return subprocess.Popen(
        [
            "storescp",
            "+tls",
            str(pki / "server.key"),
            str(pki / "server.crt"),
            "+cf",
            str(pki / "ca.crt"),
            "-rc",
            "-od",
            str(out),
            "-aet",
            "TLSPACS",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_results_go_to_a_tls_peer_with_the_nodes_client_certificate(tmp_path, pki):
    """Outgoing TLS (issue 2): a peer with ``tls = true`` is reached over TLS 1.2+, its
    certificate checked against ``[tls] ca`` and its host name, the node's certificate
    presented."""
    require_tool("storescp")
    port = free_port()
    receiver = _tls_storescp(pki, tmp_path / "received", port)
    try:
        files = write_mr_series(tmp_path / "series", 3, rows=16, columns=16)
        peers = [{"ae_title": "TLSPACS", "port": port, "may_receive": True, "tls": True}]
        tls = {
            "certificate": str(pki / "client.crt"),
            "key": str(pki / "client.key"),
            "ca": str(pki / "ca.crt"),
        }
        settings = settings_from_mapping(
            {
                "node": {"port": 0, "storage": str(tmp_path / "storage"), "disk_low_water_mb": 0},
                "peers": peers,
                "tls": tls,
            }
        )
        peer = peer_address(settings.peer("TLSPACS"), settings)
        deadline = time.monotonic() + 10
        while True:  # storescp needs a moment to listen
            try:
                assert echo(peer, timeout_s=5) == 0
                break
            except PeerError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        results = send_files(files, peer, timeout_s=10)
        assert [r.status for r in results] == [0, 0, 0]
        assert len(list((tmp_path / "received").iterdir())) == 3
        # without TLS, or with TLS but no client certificate, the peer refuses the association
        with pytest.raises(PeerError):
            echo(PeerAddress("TLSPACS", "127.0.0.1", port), timeout_s=5)
        anonymous = settings_from_mapping(
            {
                "node": {"port": 0, "storage": str(tmp_path / "storage"), "disk_low_water_mb": 0},
                "peers": peers,
                "tls": {"ca": str(pki / "ca.crt")},
            }
        )
        with pytest.raises(PeerError):
            echo(peer_address(anonymous.peer("TLSPACS"), anonymous), timeout_s=5)
    finally:
        receiver.terminate()
        receiver.wait(timeout=10)


def test_a_tls_peer_needs_a_ca_to_verify_it(tmp_path):
    with pytest.raises(ConfigError, match="tls.ca: required"):
        settings_from_mapping(
            {
                "node": {"port": 0, "storage": str(tmp_path / "storage")},
                "peers": [{"ae_title": "TLSPACS", "port": 2762, "tls": True}],
            }
        )


def test_known_ae_title_from_an_unexpected_host_is_rejected(tmp_path):
    svc = NodeService(
        settings_from_mapping(
            {
                "node": {"port": 0, "storage": str(tmp_path / "storage"), "disk_low_water_mb": 0},
                "peers": [
                    {"ae_title": "FARAWAY", "host": "192.0.2.10"},  # TEST-NET-1, not us
                    {"ae_title": "ANYWHERE", "host": "*"},
                    {"ae_title": "LOOPBACK", "host": "localhost"},
                ],
            }
        )
    )
    svc.start()
    try:
        peer = PeerAddress("SPINENODE", "127.0.0.1", svc.address[1])
        with pytest.raises(PeerError, match="rejected"):
            echo(peer, calling_ae="FARAWAY", timeout_s=5)
        assert echo(peer, calling_ae="ANYWHERE", timeout_s=5) == 0
        assert echo(peer, calling_ae="LOOPBACK", timeout_s=5) == 0
        events = svc.index.events("association_rejected")
        assert len(events) == 1 and "unexpected host 127.0.0.1" in events[0]["detail"]
    finally:
        svc.stop()


def test_unknown_calling_ae_is_accepted_when_the_check_is_switched_off(tmp_path):
    svc = NodeService(
        settings_from_mapping(
            {
                "node": {
                    "port": 0,
                    "storage": str(tmp_path / "storage"),
                    "disk_low_water_mb": 0,
                    "reject_unknown_calling_ae": False,
                },
                "peers": [{"ae_title": "ECHOSCU"}],
            }
        )
    )
    svc.start()
    try:
        assert (
            echo(
                PeerAddress("SPINENODE", "127.0.0.1", svc.address[1]),
                calling_ae="ANYONE",
                timeout_s=5,
            )
            == 0
        )
    finally:
        svc.stop()
